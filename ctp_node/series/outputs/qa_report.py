"""The one-page QA report: PNG in the job folder and one Secondary Capture image.

Laid out as the summary pages stroke teams know (RAPID, Olea, syngo.via), top to bottom:
- the volumes in large type: core (rCBF < 30 %), Tmax > 6 s, mismatch volume and ratio of the
  synthetic 1 s analysis, the acquired analysis' beside each; a withheld volume says "withheld" and
  why; the share of the analysed tissue where each map has no value the data support (validity);
- a row of slices with the core over the unenhanced CT, and one with Tmax > 6 s, each slice labelled
  with its number and position in mm, the first with the patient's R/L from ImageOrientationPatient;
- the four maps of the synthetic analysis at the slice with the most Tmax > 6 s tissue (smoothed for
  display as the colour maps are; the values are in the quantitative series);
- the chosen AIF (+) and VOF (x) voxels on the AIF's slice, mean tissue curves of the synthetic
  (lines) and acquired (markers) series over the same voxels, AIF and VOF curves of both analyses,
  legends beside the axes so that no curve is hidden;
- every volume of both analyses, the guardrail's verdict and the analyses' notes.

Matplotlib (Agg, no pyplot state); every text at least 10 pt (14 px at the page's 100 dpi). The page
says RESEARCH USE ONLY in its title.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ctp_node.files import atomic_write, fsync_dir
from ctp_node.perfusion import reliability
from ctp_node.series.outputs.colour import (
    DISPLAY_FWHM_MM,
    display_values,
    orientation_markers,
    secondary_capture,
    slice_position_mm,
)
from ctp_node.series.outputs.common import (
    RESEARCH_NOTE,
    OutputSeries,
    SeriesIdentity,
    caution,
    save_atomic,
    series_folder,
)
from ctp_node.series.outputs.inputs import MAP_NAMES, AnalysisKind, PerfusionAnalysis, PerfusionOutputInput
from ctp_node.series.outputs.styles import MAP_STYLES

FIGSIZE_IN = (16.0, 14.0)
DPI = 100  # 1600 x 1400 pixels
PNG_NAME = "qa_report.png"
MAX_SLICES = 8  # one row of slices on a 1600 px page: 200 px each
TEXT_PT = 10.0  # the smallest text: 14 px at 100 dpi
LABEL_PT = 11.0
BIG_PT = 30.0  # the volumes a reader looks for first
# The products' colours: core in pink-magenta, Tmax > 6 s in green, both over the grey CT.
CORE_RGBA = (1.0, 0.1, 0.65, 0.65)
TMAX6_RGBA = (0.1, 0.9, 0.2, 0.5)
CT_WINDOW_HU = (0.0, 80.0)  # brain window (level 40, width 80)
VERDICT_LINES = 10
NOTE_CHARS = 105  # the notes panel's width at 10 pt monospace


@dataclass(frozen=True)
class PageGeometry:
    """What the page says about where each slice lies: from the reference images (one per slice)."""

    positions_mm: tuple[float, ...] | None  # along the slice normal, per slice
    markers: dict[str, str] | None  # edge -> letters, e.g. {"left": "R", "right": "L", ...}
    spacing_mm: tuple[float, float]  # (row, column)

    @property
    def aspect(self) -> float:
        """imshow's aspect: a pixel's height over its width."""
        return self.spacing_mm[0] / self.spacing_mm[1] if self.spacing_mm[1] > 0 else 1.0

    def slice_label(self, z: int, n_z: int) -> str:
        known = self.positions_mm is not None and z < len(self.positions_mm)
        where = f", z = {self.positions_mm[z]:+.1f} mm" if known else ""  # type: ignore[index]
        return f"slice {z + 1}/{n_z}{where}"


def page_geometry(references: Sequence[Dataset] | None) -> PageGeometry:
    if not references:
        return PageGeometry(None, None, (1.0, 1.0))
    first = references[0]
    try:
        row, column = (float(v) for v in first.PixelSpacing)
        positions = tuple(slice_position_mm(ref) for ref in references)
        markers = orientation_markers(first)
    except (AttributeError, KeyError, ValueError, TypeError):  # a header without geometry: labels without mm
        return PageGeometry(None, None, (1.0, 1.0))
    return PageGeometry(positions, markers, (row, column))


def display_slice(analysis: PerfusionAnalysis) -> int:
    """The slice with the most Tmax > 6 s tissue, else the one with the most brain (else the middle)."""
    per_slice = np.asarray(analysis.tmax6_mask).sum(axis=(1, 2))
    if per_slice.max() == 0 and analysis.brain_mask is not None:
        per_slice = np.asarray(analysis.brain_mask).sum(axis=(1, 2))
    return int(np.argmax(per_slice)) if per_slice.max() > 0 else analysis.shape[0] // 2


def shown_slices(analysis: PerfusionAnalysis, limit: int = MAX_SLICES) -> list[int]:
    """The slices of the overlay rows: all of them up to ``limit``, else ``limit`` evenly spread over the
    slices holding brain, the display slice (most Tmax > 6 s) always among them."""
    n_z = analysis.shape[0]
    if n_z <= limit:
        return list(range(n_z))
    candidates = np.arange(n_z)
    if analysis.brain_mask is not None:
        holding = np.flatnonzero(np.asarray(analysis.brain_mask).any(axis=(1, 2)))
        candidates = holding if holding.size else candidates
    spread = np.linspace(0, candidates.size - 1, min(limit, candidates.size)).round().astype(int)
    picked = {int(candidates[i]) for i in spread}
    focus = display_slice(analysis)
    if focus not in picked:
        picked.remove(min(picked, key=lambda z: abs(z - focus)))
        picked.add(focus)
    return sorted(picked)


def build_report(data: PerfusionOutputInput, references: Sequence[Dataset] | None = None):
    """The page as a matplotlib Figure (Agg canvas attached); ``references``: the reference images'
    headers, one per slice (read from ``data.reference_files`` when not given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if references is None:
        references = _read_headers(data.reference_files)
    geometry = page_geometry(references)
    syn, acq = data.synthetic, data.acquired
    slices = shown_slices(syn)
    # Up to half a row of slices: core and Tmax > 6 s side by side in one row (no half-empty rows).
    paired = len(slices) <= MAX_SLICES // 2
    overlay_rows = (2.3,) if paired else (1.9, 1.9)
    heights = (0.3, 1.45, *overlay_rows, 2.3, 2.2, 2.1)
    fig = Figure(figsize=(FIGSIZE_IN[0], FIGSIZE_IN[1] - (1.6 if paired else 0.0)), dpi=DPI)
    FigureCanvasAgg(fig)
    rows = fig.add_gridspec(
        len(heights), 1, height_ratios=heights, hspace=0.36, left=0.012, right=0.988, top=0.995, bottom=0.012
    )
    _title(fig.add_subplot(rows[0]), data)
    _volume_boxes(fig, rows[1], syn, acq)
    overlays = (("core", "core\nrCBF < 30 %", CORE_RGBA), ("tmax6", "Tmax > 6 s", TMAX6_RGBA))
    if paired:
        grid = rows[2].subgridspec(1, 2 * (len(slices) + 1), width_ratios=((0.7,) + (1.0,) * len(slices)) * 2)
        cells = list(grid)
        for index, overlay in enumerate(overlays):
            group = cells[index * (len(slices) + 1) : (index + 1) * (len(slices) + 1)]
            _overlay_row(fig, group, data, slices, *overlay, geometry)
    else:
        for index, overlay in enumerate(overlays):
            grid = rows[2 + index].subgridspec(1, len(slices) + 1, width_ratios=(0.7,) + (1.0,) * len(slices))
            _overlay_row(fig, list(grid), data, slices, *overlay, geometry)
    below = 2 + len(overlay_rows)
    _maps_row(fig, rows[below], data, geometry)
    # Columns: room for the first axis' labels at the page's edge, then each curve panel and its legend's
    # own column (beside the axes: inside, a legend covered the normal tissue's peak).
    curves = rows[below + 1].subgridspec(1, 5, width_ratios=(0.055, 1.0, 0.62, 1.0, 0.55), wspace=0.05)
    _tissue_curves_panel(fig.add_subplot(curves[1]), data)
    _vessel_curves_panel(fig.add_subplot(curves[3]), syn, acq)
    texts = rows[below + 2].subgridspec(1, 2, width_ratios=(0.72, 1.28), wspace=0.015)
    _text_panel(fig.add_subplot(texts[0]), _volumes_text(syn, acq), "All volumes", "volumes")
    _text_panel(fig.add_subplot(texts[1]), _verdict_text(data), "Guardrail, withheld volumes and notes", "notes")
    return fig


def render_report(data: PerfusionOutputInput, references: Sequence[Dataset] | None = None) -> np.ndarray:
    """The page as (H, W, 3) uint8 RGB."""
    fig = build_report(data, references)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _read_headers(files: Sequence[Path]) -> list[Dataset] | None:
    try:
        return [pydicom.dcmread(Path(f), stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError):
        return None  # the page is still made, with slice numbers only


def _title(ax, data: PerfusionOutputInput) -> None:
    ax.axis("off")
    compared = " (acquired series beside it)" if data.acquired is not None else ""
    ax.text(
        0.0, 0.5, f"CT perfusion summary - {RESEARCH_NOTE}", fontsize=16, color="darkred", fontweight="bold",
        va="center", ha="left", transform=ax.transAxes,
    )  # fmt: skip
    ax.text(
        1.0, 0.5, f"synthetic 1 s series{compared}", fontsize=LABEL_PT + 2, va="center", ha="right",
        transform=ax.transAxes,
    )  # fmt: skip


# The four numbers a stroke reader looks for, in the products' order, and how each is written.
HEADLINE = (
    ("core (rCBF < 30 %)", "core_volume_ml", "core", " mL"),
    ("Tmax > 6 s", "tmax6_volume_ml", "tmax6", " mL"),
    ("mismatch volume", "mismatch_volume_ml", "mismatch", " mL"),
    ("mismatch ratio", "mismatch_ratio", "mismatch_ratio", ""),
)


def _volume_boxes(fig, cell, syn: PerfusionAnalysis, acq: PerfusionAnalysis | None) -> None:
    boxes = cell.subgridspec(1, len(HEADLINE) + 1, width_ratios=(1, 1, 1, 1, 1.25), wspace=0.06)
    for index, (title, attribute, quantity, unit) in enumerate(HEADLINE):
        ax = _box(fig.add_subplot(boxes[index]), f"headline_{quantity}")
        ax.text(0.5, 0.93, title, fontsize=LABEL_PT + 3, ha="center", va="top", transform=ax.transAxes)
        value = _headline_value(syn, attribute, quantity, unit)
        ax.text(
            0.5, 0.58, value, fontsize=BIG_PT if value != "withheld" else BIG_PT * 0.75, fontweight="bold",
            ha="center", va="center", transform=ax.transAxes, color="black" if value != "withheld" else "darkred",
        )  # fmt: skip
        lines = []
        if acq is not None:
            shown = _headline_value(acq, attribute, quantity, unit)
            lines.append(f"acquired series: {shown}" + (" (see notes)" if shown == "withheld" else ""))
        reason = _withheld_reason(syn, quantity)
        if reason:
            lines.append(reason)
        elif quantity == "mismatch" and syn.mismatch_volume_ml is not None and syn.mismatch_volume_ml < 0:
            lines.append("core larger than Tmax > 6 s: check the maps")
        # Up to three lines fit under the number; the notes panel has every reason in full.
        wrapped = [part for line in lines for part in textwrap.wrap(line, 46)]
        if len(wrapped) > 3:
            wrapped = wrapped[:2] + [textwrap.shorten(" ".join(wrapped[2:]), 46, placeholder=" ...")]
        ax.text(
            0.5, 0.3, "\n".join(wrapped), fontsize=TEXT_PT, ha="center", va="top", transform=ax.transAxes,
            linespacing=1.2,
        )  # fmt: skip
    ax = _box(fig.add_subplot(boxes[-1]), "validity")
    ax.text(
        0.04, 0.92, "invalid share: no value the data\nsupport (% of the analysed tissue)", fontsize=LABEL_PT,
        ha="left", va="top", transform=ax.transAxes,
    )  # fmt: skip
    lines = [f"{'':10}" + "".join(f"{MAP_STYLES[n].title:>5}" for n in MAP_NAMES)]
    for analysis in (a for a in (syn, acq) if a is not None):
        shares = [analysis.invalid_fraction(name) for name in MAP_NAMES]
        cells = "".join(f"{'-' if s is None else f'{100 * s:.0f}':>5}" for s in shares)
        assessed = any(s is not None for s in shares)
        lines.append(f"{analysis.kind.value:10}" + (cells if assessed else "  not assessed"))
    ax.text(
        0.04, 0.5, "\n".join(lines), family="monospace", fontsize=LABEL_PT, ha="left", va="top",
        transform=ax.transAxes, linespacing=1.4,
    )  # fmt: skip


def _box(ax, gid: str):
    ax.set_gid(gid)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor((0.94, 0.95, 0.97))
    for spine in ax.spines.values():
        spine.set_color((0.75, 0.77, 0.8))
    return ax


def _headline_value(analysis: PerfusionAnalysis, attribute: str, quantity: str, unit: str) -> str:
    if reliability.is_withheld(quantity, analysis.withheld):
        return "withheld"
    value = getattr(analysis, attribute)
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.1f}{unit}"  # a ratio to one decimal too, as the products show it


def _withheld_reason(analysis: PerfusionAnalysis, quantity: str) -> str:
    """Why ``quantity`` is withheld: the first withheld volume it is built on, with the analysis' reason."""
    for name, reason in analysis.withheld.items():
        if reliability.is_withheld(quantity, {name: reason}):
            return f"{name} withheld: {reason}"
    return ""


def _overlay_row(fig, cells, data, slices: list[int], mask: str, label: str, rgba, geometry: PageGeometry) -> None:
    """One mask of the synthetic analysis over the CT on every shown slice (``cells``: the label's, then
    one per slice), each slice labelled with its number and position."""
    syn = data.synthetic
    n_z = syn.shape[0]
    head = fig.add_subplot(cells[0])
    head.axis("off")
    volume = _headline_value(syn, f"{mask}_volume_ml", mask, " mL")
    head.text(
        0.5, 0.5, f"{label}\n\n{volume}", fontsize=LABEL_PT + 2, ha="center", va="center", fontweight="bold",
        color=tuple(0.75 * c for c in rgba[:3]), transform=head.transAxes,
    )  # fmt: skip
    withheld = reliability.is_withheld(mask, syn.withheld)
    for column, z in enumerate(slices, start=1):
        ax = fig.add_subplot(cells[column])
        ax.set_gid(f"overlay_{mask}_{z}")
        ax.imshow(_anatomy(data, z), cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1],
                  interpolation="bilinear", aspect=geometry.aspect)  # fmt: skip
        if not withheld:  # a mask without its volume is not drawn (as the SEG leaves it out)
            overlay = np.zeros((*syn.shape[1:], 4))
            overlay[np.asarray(syn.mask(mask)[z], dtype=bool)] = rgba
            ax.imshow(overlay, interpolation="nearest", aspect=geometry.aspect)
        ax.set_title(geometry.slice_label(z, n_z), fontsize=TEXT_PT, pad=3)
        ax.axis("off")
        if column == 1:
            _markers(ax, geometry)


def _markers(ax, geometry: PageGeometry) -> None:
    """The patient's left and right at the image's edges (from ImageOrientationPatient)."""
    if not geometry.markers:
        return
    for edge, (x, ha) in (("left", (0.02, "left")), ("right", (0.98, "right"))):
        ax.text(
            x, 0.5, geometry.markers[edge], transform=ax.transAxes, fontsize=LABEL_PT, fontweight="bold",
            color="white", ha=ha, va="center", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "lw": 0},
        )  # fmt: skip


def _maps_row(fig, cell, data: PerfusionOutputInput, geometry: PageGeometry) -> None:
    """The four maps of the synthetic analysis at the display slice, then the chosen vessel voxels."""
    syn = data.synthetic
    z = display_slice(syn)
    grid = cell.subgridspec(1, len(MAP_NAMES) + 2, width_ratios=(0.7,) + (1.0,) * (len(MAP_NAMES) + 1), wspace=0.3)
    head = fig.add_subplot(grid[0])
    head.axis("off")
    head.text(
        0.5, 0.68, f"maps\n{syn.label}\n{geometry.slice_label(z, syn.shape[0]).replace(', ', chr(10))}",
        fontsize=LABEL_PT + 1, ha="center", va="center", fontweight="bold", transform=head.transAxes,
    )  # fmt: skip
    head.text(
        0.5, 0.02, f"smoothed for display\n({DISPLAY_FWHM_MM:g} mm FWHM);\nvalues: quantitative\nseries",
        fontsize=TEXT_PT, ha="center", va="bottom", color="dimgray", transform=head.transAxes,
    )  # fmt: skip
    inside = None if syn.brain_mask is None else np.asarray(syn.brain_mask[z], dtype=bool)
    for column, name in enumerate(MAP_NAMES, start=1):
        style = MAP_STYLES[name]
        ax = fig.add_subplot(grid[column])
        ax.set_gid(f"map_{name}")
        image = display_values(syn.map(name)[z], inside, geometry.spacing_mm, 1)
        shown = ax.imshow(
            image, cmap=style.colormap, vmin=style.low, vmax=style.high, interpolation="bilinear",
            aspect=geometry.aspect,
        )  # fmt: skip
        ax.set_facecolor("black")
        ax.set_title(f"{style.title} ({style.unit})", fontsize=LABEL_PT)
        ax.set_xticks([])
        ax.set_yticks([])
        if column == 1:
            _markers(ax, geometry)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=TEXT_PT)
    _vessel_panel(fig.add_subplot(grid[-1]), data, syn, geometry)


def _anatomy(data: PerfusionOutputInput, z: int) -> np.ndarray:
    if data.anatomy_hu is not None:
        return np.asarray(data.anatomy_hu[z], dtype=np.float32)
    return np.nan_to_num(np.asarray(data.synthetic.cbv[z], dtype=np.float32))


def _vessel_panel(ax, data: PerfusionOutputInput, syn: PerfusionAnalysis, geometry: PageGeometry) -> None:
    """The anatomy at the slice holding most AIF voxels, AIF (+) and VOF (x) voxels of that slice."""
    ax.set_gid("vessels")
    voxels = {"AIF": syn.aif_voxels, "VOF": syn.vof_voxels}
    slices = Counter(int(v[0]) for v in (syn.aif_voxels if syn.aif_voxels is not None else []))
    if not slices:
        ax.text(0.5, 0.5, "no AIF voxels given", ha="center", va="center", transform=ax.transAxes, fontsize=LABEL_PT)
        ax.axis("off")
        return
    z = slices.most_common(1)[0][0]
    ax.imshow(_anatomy(data, z), cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], interpolation="bilinear",
              aspect=geometry.aspect)  # fmt: skip
    counts = []
    for (name, found), marker, colour in zip(voxels.items(), ("+", "x"), ("yellow", "cyan")):
        if found is None or len(found) == 0:
            continue
        here = np.asarray(found)[np.asarray(found)[:, 0] == z]
        others = len(found) - len(here)
        counts.append(f"{name} {marker} {len(here)}" + (f" of {len(found)}" if others else ""))
        ax.plot(here[:, 2], here[:, 1], marker, color=colour, markersize=9, markeredgewidth=2)
    # Counts in the title, no legend: over the image a legend covers the vessels it names.
    no_vof = "" if syn.vof_voxels is not None else ", no VOF"
    ax.set_title(
        f"{', '.join(counts)} voxels{no_vof}\n{geometry.slice_label(z, syn.shape[0])}",
        fontsize=TEXT_PT,
        linespacing=1.3,
    )
    ax.axis("off")
    _markers(ax, geometry)


def _tissue_curves_panel(ax, data: PerfusionOutputInput) -> None:
    from matplotlib.lines import Line2D

    ax.set_gid("tissue_curves")
    colours = ("tab:green", "tab:blue", "tab:red", "tab:orange", "tab:purple")
    names = list(data.synthetic_curves.curves) if data.synthetic_curves else []
    for name, colour in zip(names, colours):
        curve = data.synthetic_curves.curves[name]
        ax.plot(data.synthetic_curves.times_s, curve, "-", color=colour, label=name, lw=2)
        if data.acquired_curves and name in data.acquired_curves.curves:
            ax.plot(data.acquired_curves.times_s, data.acquired_curves.curves[name], "o", color=colour, markersize=5)
    if not names:
        ax.text(0.5, 0.5, "no tissue curves given", ha="center", va="center", transform=ax.transAxes)
    else:
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Line2D([], [], color="gray", lw=2, label=AnalysisKind.SYNTHETIC.label),
            Line2D([], [], color="gray", marker="o", ls="", label=AnalysisKind.ACQUIRED.label),
        ]
        # Beside the axes: inside, the legend covered the normal tissue's peak.
        ax.legend(handles=handles, fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    _curve_axes(ax, "mean HU", "mean tissue curves (same voxels)")


def _vessel_curves_panel(ax, syn: PerfusionAnalysis, acq: PerfusionAnalysis | None) -> None:
    ax.set_gid("vessel_curves")
    drawn = False
    for analysis, style in ((syn, "-"), (acq, "o")):
        if analysis is None:
            continue
        for name, colour in (("aif", "tab:red"), ("vof", "tab:blue")):
            curve = getattr(analysis, f"{name}_curve")
            if curve is None:
                continue
            ax.plot(
                analysis.times_s, curve, style, color=colour, markersize=5, lw=2,
                label=f"{name.upper()} {analysis.label}",
            )  # fmt: skip
            drawn = True
    if drawn:
        ax.legend(fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no AIF: maps could not be made", ha="center", va="center", transform=ax.transAxes)
    _curve_axes(ax, "enhancement (HU)", "AIF and VOF")


def _curve_axes(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("time (s)", fontsize=TEXT_PT)
    ax.set_ylabel(ylabel, fontsize=TEXT_PT)
    ax.set_title(title, fontsize=LABEL_PT)
    ax.tick_params(labelsize=TEXT_PT)
    ax.grid(alpha=0.3)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.1f}{unit}" if unit else f"{value:.2f}"


def _volumes_text(syn: PerfusionAnalysis, acq: PerfusionAnalysis | None) -> str:
    analyses = [a for a in (syn, acq) if a is not None]
    header = f"{'':30}" + "".join(f"{a.label:>14}" for a in analyses)
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
        values = "".join(f"{_shown(a, attribute, unit):>14}" for a in analyses)
        lines.append(f"{title:30}{values}")
    if any(a.valid for a in analyses):
        lines.append(f"{'invalid % CBF/CBV/MTT/Tmax':30}" + "".join(f"{_invalid(a):>14}" for a in analyses))
    return "\n".join(lines)


def _invalid(analysis: PerfusionAnalysis) -> str:
    """Share of the analysed tissue per map where the data do not support the value (``validity``)."""
    shares = [analysis.invalid_fraction(name) for name in MAP_NAMES]
    if all(share is None for share in shares):
        return "n/a"
    return "/".join("-" if share is None else f"{100 * share:.0f}" for share in shares)


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
        lines += textwrap.wrap(verdict.summary(), NOTE_CHARS)
    # Withheld volumes first: the reason a number is missing matters more than the analysis' other notes.
    for analysis in data.analyses:
        by_reason: dict[str, list[str]] = {}
        for name, reason in analysis.withheld.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():  # one line per reason: the same reason is not repeated
            lines += textwrap.wrap(f"{analysis.label}: {', '.join(names)} withheld: {reason}", NOTE_CHARS)
    for analysis in data.analyses:
        for note in analysis.notes:
            if "volume withheld:" in note:
                continue
            lines += textwrap.wrap(f"{analysis.label}: {note}", NOTE_CHARS)
    lines += [textwrap.shorten(note, NOTE_CHARS) for note in data.notes]
    if len(lines) > VERDICT_LINES:  # what the panel holds at 10 pt; the job's notes keep the rest
        lines = lines[: VERDICT_LINES - 1] + [f"... {len(lines) - VERDICT_LINES + 1} more lines in the job's notes"]
    return "\n".join(lines)


def _text_panel(ax, text: str, title: str, gid: str) -> None:
    _box(ax, gid)
    ax.set_title(title, fontsize=LABEL_PT, loc="left")
    ax.text(0.01, 0.97, text, family="monospace", fontsize=TEXT_PT, va="top", ha="left", transform=ax.transAxes)


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
    rgb = render_report(data, references)
    png = write_png(rgb, png_dir / PNG_NAME)
    folder = series_folder(out_dir, "qa_report")
    verdict = "not run" if data.guardrail is None else data.guardrail.summary()
    comment = caution(f"CT perfusion QA report: synthetic 1 s vs acquired series. Guardrail: {verdict}.")[:10240]
    # A page, not a picture of the patient: no PatientOrientation, no PixelSpacing (its images say R/L).
    sc = secondary_capture(references[0], rgb, ident, 1, comment, "QA REPORT", oriented=False)
    path = save_atomic(sc, folder / "QA_REPORT.dcm")
    fsync_dir(folder)
    series = OutputSeries(
        "qa_report", "both", "qa", ident.series_uid, ident.series_number, ident.description, folder, (path,)
    )
    return series, png
