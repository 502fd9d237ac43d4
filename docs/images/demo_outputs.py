"""Make docs/images/demo-outputs.png: one perfusion output set of the demo phantom study, as PACS shows it;
and colour-map.png (the synthetic Tmax colour map at that slice, as written) and qa-report.png (the QA report).

The demo's study (``ctp_node.demo``: 128 x 128 x 8 phantom, 6 HU noise, seed 7, acquired every 4 s)
goes through the node's series pipeline with the configured (default: demo) weights, then its 1 s
series and its acquired series through ``compute_perfusion`` and ``write_perfusion_outputs``, as the
job does. The picture is built from the written DICOM files read back: the colour Secondary Captures
(slice with the largest Tmax > 6 s volume), the SR's volumes (highdicom), and the QA report.
``colour-map-before.png`` and ``qa-report-before.png`` are the same two pictures from the writers before
issue 25 (same study, same weights).

    .venv/bin/python docs/images/demo_outputs.py [--keep /tmp/demo-outputs]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageChops, ImageDraw, ImageFont

from ctp_node.config import Settings
from ctp_node.perfusion import compute_perfusion
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series.assemble import assemble_series
from ctp_node.series.outputs import output_input, write_perfusion_outputs
from ctp_node.series.outputs.qa_report import display_slice
from ctp_node.series.pipeline import SeriesPipeline, run_series

PICTURE = Path(__file__).with_name("demo-outputs.png")
COLOUR_MAP = Path(__file__).with_name("colour-map.png")
QA_REPORT = Path(__file__).with_name("qa-report.png")
WIDTH = 1200


def run(folder: Path):
    study = generate_phantom(PhantomConfig(matrix=128, slices=8, duration_s=61, noise_hu=6.0, lesion=True, seed=7))
    acquired_files = write_study(
        sample_study(study, parse_schedule("every:4")), folder / "scanner", uid_seed="ctp-node demo"
    )
    acquired = assemble_series(acquired_files)
    result = run_series(SeriesPipeline.from_settings(Settings()), acquired_files, folder / "derived")
    voxel_ml = float(np.prod(acquired.spacing_mm)) / 1000.0
    synthetic_times = np.asarray(result.times_s) - float(result.times_s[0])
    maps = compute_perfusion(result.hu, synthetic_times, voxel_ml)
    maps_acquired = compute_perfusion(acquired.hu, acquired.times_s, voxel_ml)
    n_z = acquired.hu.shape[1]
    data = output_input(
        maps, result.hu, result.derived.paths[:n_z], acquired.series_uid, voxel_volume_ml=voxel_ml,
        acquired_maps=maps_acquired, acquired_hu=acquired.hu, guardrail=result.guardrail,
    )  # fmt: skip
    written = write_perfusion_outputs(data, folder / "perfusion", png_dir=folder)
    return data, written, folder / "qa_report.png"


def composite(data, written, qa_png: Path) -> Image.Image:
    z = display_slice(data.synthetic)
    tiles = []
    for name in ("cbf", "cbv", "mtt", "tmax"):
        series = next(s for s in written if s.kind == "colour_map" and s.analysis == "synthetic" and s.name == name)
        tiles.append(Image.fromarray(pydicom.dcmread(series.paths[z]).pixel_array))
    scale = WIDTH / sum(t.width for t in tiles)
    # Lanczos: the tiles are made smaller, and nearest-neighbour would drop strokes of their text.
    tiles = [t.resize((round(t.width * scale), round(t.height * scale)), Image.LANCZOS) for t in tiles]
    row_h = max(t.height for t in tiles)
    volumes = _volumes_lines(written)
    font = ImageFont.load_default(size=16)
    text_h = 44 + 24 * len(volumes)
    qa = Image.open(qa_png).convert("RGB")
    left, top, right, bottom = ImageChops.difference(qa, Image.new("RGB", qa.size, "white")).getbbox()
    qa = qa.crop((max(left - 12, 0), max(top - 12, 0), min(right + 12, qa.width), min(bottom + 12, qa.height)))
    qa = qa.resize((WIDTH, round(qa.height * WIDTH / qa.width)), Image.LANCZOS)
    page = Image.new("RGB", (WIDTH, row_h + text_h + qa.height), "white")
    x = 0
    for tile in tiles:
        page.paste(tile, (x, 0))
        x += tile.width
    draw = ImageDraw.Draw(page)
    draw.text((10, row_h + 6), "SR (TID 1500) read back with highdicom:", fill="black", font=font)
    for i, line in enumerate(volumes):
        draw.text((30, row_h + 30 + 24 * i), line, fill="black", font=font)
    page.paste(qa, (0, row_h + text_h))
    return page.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # a palette PNG, far smaller than RGB


def singles(data, written, qa_png: Path) -> None:
    """The Tmax colour map as written (1:1 pixels) and the QA report as a palette PNG."""
    z = display_slice(data.synthetic)
    series = next(s for s in written if s.kind == "colour_map" and s.analysis == "synthetic" and s.name == "tmax")
    Image.fromarray(pydicom.dcmread(series.paths[z]).pixel_array).save(COLOUR_MAP, optimize=True)
    qa = Image.open(qa_png).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    qa.save(QA_REPORT, optimize=True)


def _volumes_lines(written) -> list[str]:
    lines = []
    for analysis in ("synthetic", "acquired"):
        series = next(s for s in written if s.kind == "sr" and s.analysis == analysis)
        groups = hd.sr.srread(series.paths[0]).content.get_image_measurement_groups()
        parts = []
        for group in groups:
            measurements = group.get_measurements()
            if not measurements:  # a withheld volume: the SR says "Indeterminate" with the reason
                parts.append(f"{group.tracking_identifier} withheld")
                continue
            unit = " mL" if measurements[0].unit.value == "ml" else ""
            parts.append(f"{group.tracking_identifier} {measurements[0].value:.1f}{unit}")
        lines.append(f"{analysis}: " + ", ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ctp-demo-outputs-"))
    data, written, qa_png = run(folder)
    page = composite(data, written, qa_png)
    page.save(PICTURE, optimize=True)
    singles(data, written, qa_png)
    for picture in (PICTURE, COLOUR_MAP, QA_REPORT):
        with Image.open(picture) as image:
            print(f"{picture}: {image.width} x {image.height}, {picture.stat().st_size / 1000:.0f} kB")
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
