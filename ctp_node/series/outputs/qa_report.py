"""The one-page QA report: PNG in the job folder and one Secondary Capture image.

What it shows (matplotlib, Agg, no pyplot state): the four maps of the synthetic analysis at the
slice with the most Tmax > 6 s tissue; core and Tmax > 6 s over the anatomy; the chosen AIF (+) and
VOF (x) voxels on the AIF's slice; mean tissue curves of the synthetic (lines) and acquired (markers)
series over the same voxels; AIF and VOF curves of both analyses; the volumes of both analyses; the
guardrail's verdict and the analyses' notes. The page says RESEARCH USE ONLY in its title.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ctp_node.files import atomic_write, fsync_dir
from ctp_node.perfusion import reliability
from ctp_node.series.outputs.colour import secondary_capture
from ctp_node.series.outputs.common import (
    RESEARCH_NOTE,
    OutputSeries,
    SeriesIdentity,
    caution,
    save_atomic,
    series_folder,
)
from ctp_node.series.outputs.inputs import MAP_NAMES, PerfusionAnalysis, PerfusionOutputInput
from ctp_node.series.outputs.styles import MAP_STYLES

FIGSIZE_IN = (16.0, 11.0)
DPI = 100  # 1600 x 1100 pixels
PNG_NAME = "qa_report.png"


def display_slice(analysis: PerfusionAnalysis) -> int:
    """The slice with the most Tmax > 6 s tissue, else the one with the most brain (else the middle)."""
    per_slice = np.asarray(analysis.tmax6_mask).sum(axis=(1, 2))
    if per_slice.max() == 0 and analysis.brain_mask is not None:
        per_slice = np.asarray(analysis.brain_mask).sum(axis=(1, 2))
    return int(np.argmax(per_slice)) if per_slice.max() > 0 else analysis.shape[0] // 2


def render_report(data: PerfusionOutputInput) -> np.ndarray:
    """The page as (H, W, 3) uint8 RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    syn, acq = data.synthetic, data.acquired
    z = display_slice(syn)
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 4, height_ratios=(1.0, 1.0, 0.55), hspace=0.35, wspace=0.3)
    inside = None if syn.brain_mask is None else np.asarray(syn.brain_mask[z], dtype=bool)
    for column, name in enumerate(MAP_NAMES):
        style = MAP_STYLES[name]
        ax = fig.add_subplot(grid[0, column])
        image = np.asarray(syn.map(name)[z], dtype=np.float32)
        shown = ax.imshow(
            np.where(inside, image, np.nan) if inside is not None else image,
            cmap=style.colormap, vmin=style.low, vmax=style.high, interpolation="nearest",
        )  # fmt: skip
        ax.set_title(f"{style.title} ({style.unit}), slice {z + 1}", fontsize=10)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    anatomy = _anatomy(data, z)
    _lesion_panel(fig.add_subplot(grid[1, 0]), anatomy, syn, z)
    _vessel_panel(fig.add_subplot(grid[1, 1]), data, syn)
    _tissue_curves_panel(fig.add_subplot(grid[1, 2]), data)
    _vessel_curves_panel(fig.add_subplot(grid[1, 3]), syn, acq)
    _text_panel(fig.add_subplot(grid[2, :2]), _volumes_text(syn, acq), "Volumes")
    _text_panel(fig.add_subplot(grid[2, 2:]), _verdict_text(data), "Guardrail and notes")
    fig.suptitle(
        f"CT perfusion QA report - {RESEARCH_NOTE} - synthetic 1 s series vs acquired series", fontsize=14,
        color="darkred", fontweight="bold",
    )  # fmt: skip
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _anatomy(data: PerfusionOutputInput, z: int) -> np.ndarray:
    if data.anatomy_hu is not None:
        return np.asarray(data.anatomy_hu[z], dtype=np.float32)
    return np.nan_to_num(np.asarray(data.synthetic.cbv[z], dtype=np.float32))


def _lesion_panel(ax, anatomy: np.ndarray, syn: PerfusionAnalysis, z: int) -> None:
    ax.imshow(anatomy, cmap="gray", vmin=0, vmax=80, interpolation="nearest")
    overlay = np.zeros((*anatomy.shape, 4))
    overlay[np.asarray(syn.tmax6_mask[z])] = (0.1, 0.4, 1.0, 0.45)
    overlay[np.asarray(syn.tmax10_mask[z])] = (0.6, 0.2, 1.0, 0.55)
    overlay[np.asarray(syn.core_mask[z])] = (1.0, 0.1, 0.1, 0.7)
    ax.imshow(overlay, interpolation="nearest")
    ax.set_title("core (red), Tmax>10 s (violet), Tmax>6 s (blue)", fontsize=9)
    ax.axis("off")


def _vessel_panel(ax, data: PerfusionOutputInput, syn: PerfusionAnalysis) -> None:
    """The anatomy at the slice holding most AIF voxels, AIF (+) and VOF (x) voxels of that slice."""
    voxels = {"AIF": syn.aif_voxels, "VOF": syn.vof_voxels}
    slices = Counter(int(v[0]) for v in (syn.aif_voxels if syn.aif_voxels is not None else []))
    if not slices:
        ax.text(0.5, 0.5, "no AIF voxels given", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return
    z = slices.most_common(1)[0][0]
    ax.imshow(_anatomy(data, z), cmap="gray", vmin=0, vmax=80, interpolation="nearest")
    for (name, found), marker, colour in zip(voxels.items(), ("+", "x"), ("yellow", "cyan")):
        if found is None or len(found) == 0:
            continue
        here = np.asarray(found)[np.asarray(found)[:, 0] == z]
        others = len(found) - len(here)
        label = f"{name} ({len(here)} here" + (f", {others} on other slices)" if others else ")")
        ax.plot(here[:, 2], here[:, 1], marker, color=colour, markersize=9, markeredgewidth=2, label=label)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
    ax.set_title(
        f"chosen vessel voxels, slice {z + 1}" + ("" if syn.vof_voxels is not None else " (no VOF)"), fontsize=9
    )
    ax.axis("off")


def _tissue_curves_panel(ax, data: PerfusionOutputInput) -> None:
    colours = ("tab:green", "tab:blue", "tab:red", "tab:orange", "tab:purple")
    shown = False
    names = list(data.synthetic_curves.curves) if data.synthetic_curves else []
    for name, colour in zip(names, colours):
        curve = data.synthetic_curves.curves[name]
        ax.plot(data.synthetic_curves.times_s, curve, "-", color=colour, label=name)
        shown = True
        if data.acquired_curves and name in data.acquired_curves.curves:
            ax.plot(
                data.acquired_curves.times_s,
                data.acquired_curves.curves[name],
                "o",
                color=colour,
                markersize=5,
            )
    if not shown:
        ax.text(0.5, 0.5, "no tissue curves given", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mean HU")
    ax.set_title("mean tissue curves: synthetic (line), acquired (o)", fontsize=9)


def _vessel_curves_panel(ax, syn: PerfusionAnalysis, acq: PerfusionAnalysis | None) -> None:
    drawn = False
    for analysis, style in ((syn, "-"), (acq, "o")):
        if analysis is None:
            continue
        for name, colour in (("aif", "tab:red"), ("vof", "tab:blue")):
            curve = getattr(analysis, f"{name}_curve")
            if curve is None:
                continue
            ax.plot(
                analysis.times_s, curve, style, color=colour, markersize=5, label=f"{name.upper()} {analysis.label}"
            )
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no AIF: maps could not be made", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("enhancement (HU)")
    ax.set_title("AIF and VOF: synthetic (line), acquired (o)", fontsize=9)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.1f}{unit}" if unit else f"{value:.2f}"


def _volumes_text(syn: PerfusionAnalysis, acq: PerfusionAnalysis | None) -> str:
    analyses = [a for a in (syn, acq) if a is not None]
    header = f"{'':34}" + "".join(f"{a.label:>18}" for a in analyses)
    rows = [
        ("core, rCBF < 30 % (mL)", "core_volume_ml", " "),
        ("Tmax > 6 s (mL)", "tmax6_volume_ml", " "),
        ("Tmax > 10 s (mL)", "tmax10_volume_ml", " "),
        ("mismatch volume (mL)", "mismatch_volume_ml", " "),
        ("mismatch ratio", "mismatch_ratio", ""),
        ("hypoperfusion intensity ratio", "hypoperfusion_intensity_ratio", ""),
        ("reference CBF (mL/100 g/min)", "reference_cbf", " "),
    ]
    lines = [header]
    for title, attribute, unit in rows:
        values = "".join(f"{_shown(a, attribute, unit):>18}" for a in analyses)
        lines.append(f"{title:34}{values}")
    return "\n".join(lines)


# The QA report's rows by what they are (``reliability.BUILT_ON``): "withheld", not "n/a", when withheld.
QUANTITY = {
    "core_volume_ml": "core", "tmax6_volume_ml": "tmax6", "tmax10_volume_ml": "tmax10",
    "mismatch_volume_ml": "mismatch", "mismatch_ratio": "mismatch_ratio",
    "hypoperfusion_intensity_ratio": "hypoperfusion_intensity_ratio",
}  # fmt: skip


def _shown(analysis: PerfusionAnalysis, attribute: str, unit: str) -> str:
    quantity = QUANTITY.get(attribute)
    if quantity is not None and reliability.is_withheld(quantity, analysis.withheld):
        return "withheld"
    return _fmt(getattr(analysis, attribute), unit).strip()


def _verdict_text(data: PerfusionOutputInput) -> str:
    verdict = data.guardrail
    if verdict is None:
        lines = ["guardrail: not run"]
    else:
        lines = [f"guardrail ({verdict.policy}): {'PASS' if verdict.passed else verdict.action.upper()}"]
        lines += textwrap.wrap(verdict.summary(), 80)
    # Withheld volumes first: the reason a number is missing matters more than the analysis' other notes.
    for analysis in data.analyses:
        for name, reason in analysis.withheld.items():
            lines += textwrap.wrap(f"{analysis.label}: {name} withheld: {reason}", 80)
    for analysis in data.analyses:
        for note in analysis.notes:
            if "volume withheld:" in note:
                continue
            lines += textwrap.wrap(f"{analysis.label}: {note}", 80)
    lines += [textwrap.shorten(note, 80) for note in data.notes]
    return "\n".join(lines[:9])


def _text_panel(ax, text: str, title: str) -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left")
    ax.text(0.0, 1.0, text, family="monospace", fontsize=9, va="top", ha="left", transform=ax.transAxes)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    """The page as PNG (modes as all patient data; atomic rename)."""
    from PIL import Image

    with atomic_write(path) as fh:
        Image.fromarray(rgb).save(fh, format="PNG", optimize=True)
    return path


def write_qa_report(
    data: PerfusionOutputInput, references: list[Dataset], ident: SeriesIdentity, out_dir: Path, png_dir: Path
) -> tuple[OutputSeries, Path]:
    """The report as PNG in ``png_dir`` and as one Secondary Capture in ``out_dir/<folder>``."""
    rgb = render_report(data)
    png = write_png(rgb, png_dir / PNG_NAME)
    folder = series_folder(out_dir, "qa_report")
    verdict = "not run" if data.guardrail is None else data.guardrail.summary()
    comment = caution(f"CT perfusion QA report: synthetic 1 s vs acquired series. Guardrail: {verdict}.")[:10240]
    sc = secondary_capture(references[0], rgb, ident, 1, comment, "QA REPORT")
    path = save_atomic(sc, folder / "QA_REPORT.dcm")
    fsync_dir(folder)
    series = OutputSeries(
        "qa_report", "both", "qa", ident.series_uid, ident.series_number, ident.description, folder, (path,)
    )
    return series, png
