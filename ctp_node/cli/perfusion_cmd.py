"""`ctp-node perfusion`: perfusion maps (CBF, CBV, MTT, Tmax, TTP, core, hypoperfusion) of one series.

Input: a DICOM folder (assembled by ``ctp_node.series.assemble``), a ``.npy`` (T, Z, Y, X) HU array with
``--times`` or a ``<stem>.json`` sidecar (``{"times_s": [...], "spacing_mm": [z, y, x]}``), or with
``--model-layout`` the published array layout (8, 192, 192, T) in 0..80 HU. Output: maps.npz,
summary.json, perfusion.png and, with ``--nifti``, one .nii.gz per map and mask.

Printed: the volumes (core rCBF < 30 %, Tmax > 6 s, Tmax > 10 s, mismatch volume and ratio,
hypoperfusion intensity ratio), the chosen AIF and VOF voxels with the reasons, and, with ``--truth``
(a phantom's ``truth.npz``), the accuracy targets' numbers against the true maps (also in
summary.json under ``agreement_with_truth``). A truth is only ever the one given: a ``truth.npz``
that happens to lie near the input may be another study's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ctp_node.cli.progress import stderr

if TYPE_CHECKING:
    import numpy as np

    from ctp_node.perfusion import PerfusionSettings

WINDOWED_AIF_MIN_PEAK_HU = 20.0  # arteries saturate at 80 HU in the window: 40 HU above blood at most
# --denoise gaussian: 1.25 mm, one pixel of the 192 model grid.
SMOOTHING_SIGMA_MM = 1.25
MODEL_GRID_PIXEL_MM = 1.25  # assumed pixel of arrays given without --spacing


@dataclass
class _Input:
    hu: np.ndarray  # (T, Z, Y, X) HU
    times_s: np.ndarray  # (T,) s
    spacing_mm: tuple[float, float, float] | None  # (z, y, x)
    brain_mask: np.ndarray | None = None  # given for skull-stripped model-layout arrays
    origin: tuple[float, float, float] | None = None  # (x, y, z) mm, DICOM input only
    direction: np.ndarray | None = None


def _floats(text: str, option: str, count: int | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"{option} must be comma-separated numbers: {exc}") from exc
    if count is not None and len(values) != count:
        raise typer.BadParameter(f"{option} needs {count} values, got {len(values)}")
    return values


def _load_dicom(folder: Path) -> _Input:
    from ctp_node.errors import CTPInputError
    from ctp_node.series.assemble import assemble_series

    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    try:
        series = assemble_series(paths)
    except CTPInputError as exc:
        raise typer.BadParameter(f"{folder} is not one complete CTP series: {exc}") from exc
    spacing = tuple(float(v) for v in series.spacing_mm)
    return _Input(series.hu, series.times_s, spacing, origin=series.origin, direction=series.direction)


def _load_array(path: Path, times: str | None, spacing: str | None, model_layout: bool) -> _Input:
    import numpy as np

    array = np.load(path, mmap_mode="r")
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    if model_layout:
        if array.ndim != 4 or array.shape[:3] != (8, 192, 192):
            raise typer.BadParameter(f"--model-layout expects (8, 192, 192, T), got {array.shape}")
        array = np.moveaxis(array, -1, 0)
    elif array.ndim != 4:
        raise typer.BadParameter(f"{path} must hold a (T, Z, Y, X) HU array, got shape {array.shape}")
    if times is not None:
        times_s = _floats(times, "--times")
    elif "times_s" in meta:
        times_s = [float(t) for t in meta["times_s"]]
    elif model_layout:
        times_s = list(range(array.shape[0]))  # the published sequences are 1 s apart
    else:
        raise typer.BadParameter(f"give --times or a sidecar {sidecar.name} with 'times_s' (s per volume)")
    spacing_mm = _floats(spacing, "--spacing", 3) if spacing else meta.get("spacing_mm")
    hu = np.asarray(array, dtype=np.float32)
    brain = None
    if model_layout:
        from model.window import tissue_mask

        brain = tissue_mask(hu)  # the published data are skull-stripped: 0 outside the brain
    return _Input(hu, np.asarray(times_s, dtype=np.float64), tuple(spacing_mm) if spacing_mm else None, brain)


def _settings(
    data: _Input, k: float, smooth_mm: float, aif_min_peak: float | None, model_layout: bool, denoise: str = "tips"
) -> PerfusionSettings:
    """Analysis settings: the pixel size, smoothing converted from mm to pixels, the windowed AIF floor."""
    from ctp_node.perfusion import PerfusionSettings

    pixel_mm = MODEL_GRID_PIXEL_MM if data.spacing_mm is None else float(data.spacing_mm[2])
    smoothing = smooth_mm / pixel_mm
    settings = PerfusionSettings(k=k, denoise=denoise, smoothing_sigma_vox=smoothing, pixel_mm=pixel_mm)  # type: ignore[arg-type]
    min_peak = aif_min_peak or (WINDOWED_AIF_MIN_PEAK_HU if model_layout else None)
    return settings if min_peak is None else replace(settings, aif_min_peak_hu=min_peak)


def perfusion(
    input_path: Path = typer.Argument(..., help="DICOM folder, or a .npy (T, Z, Y, X) HU array."),
    output: Path = typer.Option(Path("out/perfusion"), "--output", "-o", help="Folder for maps and figure."),
    times: str | None = typer.Option(None, "--times", help="Time (s) of each volume, e.g. 0,1,2,4.5."),
    spacing: str | None = typer.Option(None, "--spacing", help="Voxel size z,y,x in mm (arrays only)."),
    model_layout: bool = typer.Option(
        False, "--model-layout", help="The .npy is the published (8, 192, 192, T) layout, 0..80 HU, 1 s."
    ),
    method: str = typer.Option(
        "parametric",
        help="parametric (model-based fit: delay, transit time and residue shape per voxel; delay-"
        "insensitive Tmax, unbiased CBF), bsvd (block-circulant SVD) or osvd (oscillation-index SVD).",
    ),
    denoise: str = typer.Option(
        "tips",
        help="Noise handling of the tissue curves: tips (model subspace + edge-preserving bilateral "
        "filter, noise measured on the baseline), gaussian (--smooth-mm) or none.",
    ),
    k: float = typer.Option(
        (1 - 0.45) / (1 - 0.25) / 1.05, help="Haematocrit/density factor (0.698); 1 for uncorrected values."
    ),
    aif_min_peak: float | None = typer.Option(
        None, help="Least AIF enhancement in HU (default 50; 20 with --model-layout)."
    ),
    smooth_mm: float = typer.Option(
        SMOOTHING_SIGMA_MM, help="In-plane Gaussian sigma (mm) of --denoise gaussian; 0 = none."
    ),
    aif_mask: Path | None = typer.Option(
        None, "--aif-mask", help="A .npy (Z, Y, X) bool array marking arterial voxels (skips automatic AIF)."
    ),
    nifti: bool = typer.Option(False, "--nifti", help="Also write one .nii.gz per map and mask."),
    truth: Path | None = typer.Option(
        None,
        "--truth",
        help="A phantom's truth.npz (`ctp-node phantom` writes it beside the study): report the agreement "
        "with the true maps.",
    ),
) -> None:
    """Compute perfusion maps, core and hypoperfusion of one CTP series and draw them."""
    import numpy as np

    from ctp_node.errors import PerfusionError
    from ctp_node.perfusion import compute_perfusion
    from ctp_node.perfusion.export import write_nifti, write_npz, write_summary
    from ctp_node.perfusion.figure import save_figure

    if method not in ("bsvd", "osvd", "parametric"):
        raise typer.BadParameter("--method must be parametric, bsvd or osvd")
    if denoise not in ("tips", "gaussian", "none"):
        raise typer.BadParameter("--denoise must be tips, gaussian or none")
    if smooth_mm < 0:
        raise typer.BadParameter("--smooth-mm must be >= 0")
    if not input_path.exists():
        raise typer.BadParameter(f"{input_path} does not exist")
    if truth is not None and not truth.is_file():
        raise typer.BadParameter(f"--truth {truth} does not exist")
    true_maps = None if truth is None else _read_truth(truth)  # before the analysis: fail in seconds
    data = _load_dicom(input_path) if input_path.is_dir() else _load_array(input_path, times, spacing, model_layout)
    settings = _settings(data, k, smooth_mm, aif_min_peak, model_layout, denoise)
    if model_layout:
        stderr.print("[yellow]windowed 0..80 HU input: arteries saturate, so CBF and CBV are not absolute[/]")
    voxel_ml = None if data.spacing_mm is None else float(np.prod(data.spacing_mm)) / 1000.0
    arteries = None if aif_mask is None else np.load(aif_mask).astype(bool)
    try:
        maps = compute_perfusion(
            data.hu, data.times_s, voxel_ml, method, data.brain_mask, arteries, settings=settings
        )  # fmt: skip
    except PerfusionError as exc:
        stderr.print(f"[red]perfusion analysis failed:[/] {exc}")
        raise typer.Exit(1) from exc
    truth_path = truth
    agreement = None
    if truth_path is not None and true_maps is not None:
        agreement = _agreement_with_truth(maps, true_maps, truth_path, data.spacing_mm)
    output.mkdir(parents=True, exist_ok=True)
    write_npz(output / "maps.npz", maps)
    extra = {"input": str(input_path), "spacing_mm": data.spacing_mm}
    if agreement is not None:
        extra |= {"truth": str(truth_path), "agreement_with_truth": agreement}
    write_summary(output / "summary.json", maps, extra)
    if nifti:
        write_nifti(output, maps, data.spacing_mm, data.origin, data.direction)
    save_figure(output / "perfusion.png", data.hu, maps, title=input_path.name)
    typer.echo(f"{input_path.name}: {_volumes_line(maps)}; wrote {output}")
    for line in _input_function_lines(maps):
        typer.echo(line)
    normal = maps.tissue_mask & ~maps.hypoperfusion_mask & (maps.tmax < 2.0)
    if normal.any():
        typer.echo(
            f"reference CBF {maps.reference_cbf:.1f} mL/100 g/min; normal tissue median CBF "
            f"{float(np.median(maps.cbf[normal])):.1f}, CBV {float(np.median(maps.cbv[normal])):.2f} mL/100 g, "
            f"Tmax {float(np.median(maps.tmax[normal])):.1f} s"
            + ("" if maps.noise_hu is None else f"; noise {maps.noise_hu:.1f} HU")
        )
    if agreement is not None:
        typer.echo(_agreement_line(agreement, truth_path))


def _volumes_line(maps) -> str:
    from ctp_node.perfusion.reliability import is_withheld

    if maps.voxel_volume_ml is None:
        return "(no voxel size: volumes not reported)"
    withheld = maps.withheld

    def shown(quantity: str, value: float | None, fmt: str = "{:.1f} mL", none: str = "n/a") -> str:
        if is_withheld(quantity, withheld):
            return "withheld"
        return none if value is None else fmt.format(value)

    line = (
        f"core (rCBF < 30 %) {shown('core', maps.core_volume_ml)}, "
        f"Tmax > 6 s {shown('tmax6', maps.hypoperfusion_volume_ml)}, "
        f"Tmax > 10 s {shown('tmax10', maps.severe_hypoperfusion_volume_ml)}, "
        f"mismatch {shown('mismatch', maps.mismatch_volume_ml)} "
        f"(ratio {shown('mismatch_ratio', maps.mismatch_ratio, '{:.1f}', 'n/a (no core)')}), "
        "hypoperfusion intensity ratio "
        + shown("hypoperfusion_intensity_ratio", maps.hypoperfusion_intensity_ratio, "{:.2f}")
    )
    reasons = [f"\n  {name} withheld: {reason}" for name, reason in withheld.items()]
    core_check = maps.volume_checks.get("core")
    if core_check is not None and core_check.noise is not None and not core_check.withheld:
        noise = core_check.noise
        reasons.insert(
            0,
            f"\n  core under the study's own noise: {noise.low_ml:.1f}-{noise.high_ml:.1f} mL (95 %, "
            f"{noise.replicates} replicates); {noise.uncertain_ml:.1f} mL of it within its voxels' noise of "
            "the threshold",
        )
    return line + "".join(reasons)


def _input_function_lines(maps) -> list[str]:
    """The chosen AIF and VOF voxels and why (first few voxels; all of them are in summary.json)."""
    selection = maps.aif_selection
    if selection is None:
        return [f"AIF from {len(maps.aif_voxels)} voxels"]

    def voxels(array) -> str:
        shown = ", ".join(f"({z},{y},{x})" for z, y, x in array[:4].tolist())
        return shown + (f" and {len(array) - 4} more" if len(array) > 4 else "")

    lines = [f"AIF voxels (z,y,x): {voxels(selection.aif.voxels)}"]
    if selection.vof is not None:
        lines.append(f"VOF voxels (z,y,x): {voxels(selection.vof.voxels)}")
    lines += [f"  {reason}" for reason in selection.reasons]
    return lines


# What the agreement reads from a truth.npz (ctp_node.phantom.export.write_truth writes more).
TRUTH_ARRAYS = ("cbf", "cbv", "tmax", "labels", "core_mask")


def _read_truth(path: Path) -> dict[str, np.ndarray]:
    """The true maps of ``--truth``; exit 2 with one line saying what is wrong with the file."""
    import zipfile

    import numpy as np
    from rich.markup import escape

    def refuse(reason: str) -> typer.Exit:
        stderr.print(f"[red]error:[/] --truth {escape(str(path))} is not a phantom's truth: {escape(reason)}")
        return typer.Exit(2)

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise refuse(f"not an .npz archive ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise refuse("it holds one array, not the named true maps")
    with loaded as npz:
        missing = [name for name in TRUTH_ARRAYS if name not in npz.files]
        if missing:
            raise refuse(
                f"it has no {', '.join(missing)} (it holds {', '.join(npz.files) or 'nothing'}); give the "
                "truth.npz that `ctp-node phantom` wrote with this study"
            )
        try:
            arrays = {name: npz[name] for name in TRUTH_ARRAYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise refuse(f"unreadable ({exc})") from exc
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise refuse(f"its maps differ in shape {shapes}")
    return arrays


def _agreement_with_truth(maps, arrays: dict[str, np.ndarray], truth_path: Path, spacing_mm) -> dict | None:
    """The accuracy targets' numbers against a phantom's true maps (None when the grids differ)."""
    from types import SimpleNamespace

    import numpy as np

    from ctp_node.evaluation.perfusion_accuracy import accuracy
    from ctp_node.perfusion.lesion import convention_masks
    from ctp_node.phantom.tissue import PERFUSION

    arrays = dict(arrays)
    if arrays["cbf"].shape != maps.cbf.shape or spacing_mm is None:
        stderr.print(f"[yellow]{truth_path} does not match the analysed grid (or no voxel size): no agreement[/]")
        return None
    arrays["parenchyma_mask"] = np.isin(arrays["labels"], list(PERFUSION))
    study = SimpleNamespace(truth=SimpleNamespace(**arrays), spacing_mm=tuple(spacing_mm))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    truth_masks = convention_masks(arrays["cbf"], arrays["tmax"], arrays["parenchyma_mask"], voxel_ml)
    return {key: round(float(value), 4) for key, value in accuracy(maps, study, truth_masks).items()}


def _agreement_line(agreement: dict, truth_path: Path) -> str:
    a = agreement
    return (
        f"against {truth_path}: core {a['core_ml']:.1f} mL (truth {a['core_true_ml']:.1f}), Tmax > 6 s "
        f"{a['tmax6_ml']:.1f} mL (truth {a['tmax6_true_ml']:.1f}); median CBF / CBV error white matter "
        f"{a['cbf_wm_rel']:+.0%} / {a['cbv_wm_rel']:+.0%}, core {a['cbf_core_rel']:+.0%} / {a['cbv_core_rel']:+.0%}; "
        f"Tmax in normal tissue off by {a['tmax_normal_s']:.2f} s (median)"
    )
