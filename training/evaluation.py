"""`ctp-node evaluate`: the model against the linear baseline and against the 1 s truth, per gap.

Phantom studies go through the node's own path (acquired every G s -> model grid -> inpaint -> back
to scanner geometry with vessels and bone interpolated, exactly as a PACS would receive it), so the
perfusion maps are those a reader would get. Measured on the synthetic seconds inside the brain:
masked PSNR and SSIM in the 0..80 HU window; on the maps (model-based deconvolution, conventions of
``ctp_node.perfusion.lesion``): median errors per map in grey and white matter, Dice and volume of
core and hypoperfusion, against the phantom's truth and against the maps of the full 1 s series.

User data in the published layout (``.npy`` 8 x 192 x 192 x T, 0..80 HU) get the image metrics
only: windowed arrays hold no arterial input above 80 HU, so no perfusion analysis is possible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctp_node.evaluation.metrics import ReferenceMaps, perfusion_agreement, sequence_image_metrics
from model.baseline import linear_inpaint
from model.engine import Inpainter
from model.window import from_model_space, to_model_space

ProgressFn = Callable[[str], None]
MAPS = ("cbf", "cbv", "mtt", "tmax")


@dataclass(frozen=True)
class PhantomEvalSettings:
    gaps: tuple[int, ...] = (2, 4, 8)
    studies: int = 3
    seed: int = 10_000  # far from training seeds
    matrix: int = 192
    slices: int = 8
    duration_s: int = 61
    noise_hu: float = 6.0
    lesion: bool = True


@dataclass
class Row:
    """One (study, gap, method) evaluation."""

    study: str
    gap_s: int
    method: str  # model | linear
    psnr_db: float
    ssim: float
    mae_hu: float
    perfusion_vs_truth: dict[str, Any] | None = None
    perfusion_vs_1s: dict[str, Any] | None = None


@dataclass
class EvaluationReport:
    rows: list[Row] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """Means over studies per (gap, method)."""
        out = []
        for gap in sorted({r.gap_s for r in self.rows}):
            for method in ("model", "linear"):
                rows = [r for r in self.rows if r.gap_s == gap and r.method == method]
                if not rows:
                    continue
                item: dict[str, Any] = {"gap_s": gap, "method": method, "studies": len(rows)}
                for key in ("psnr_db", "ssim", "mae_hu"):
                    item[key] = float(np.mean([getattr(r, key) for r in rows]))
                if rows[0].perfusion_vs_truth is not None:
                    for name in MAPS:
                        for region in ("grey", "white"):
                            item[f"{name}_{region}_rel_err"] = float(
                                np.mean([r.perfusion_vs_truth["maps"][name][region]["median_rel_error"] for r in rows])
                            )
                    item["tmax_grey_abs_err_s"] = float(
                        np.mean([r.perfusion_vs_truth["maps"]["tmax"]["grey"]["median_abs_error"] for r in rows])
                    )
                    for mask in ("core", "hypoperfusion"):
                        item[f"{mask}_dice"] = float(np.mean([r.perfusion_vs_truth[mask]["dice"] for r in rows]))
                        item[f"{mask}_abs_volume_error_ml"] = float(
                            np.mean([r.perfusion_vs_truth[mask]["abs_volume_error_ml"] for r in rows])
                        )
                out.append(item)
        return out

    def markdown(self) -> str:
        lines = [
            "| gap (s) | method | PSNR (dB) | SSIM | CBF rel. err. GM | CBV rel. err. GM | Tmax abs. err. GM (s) "
            "| core Dice | hypoperfusion Dice |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in self.summary():
            perf = (
                f"{s['cbf_grey_rel_err']:.1%} | {s['cbv_grey_rel_err']:.1%} | {s['tmax_grey_abs_err_s']:.2f} | "
                f"{s['core_dice']:.2f} | {s['hypoperfusion_dice']:.2f}"
                if "core_dice" in s
                else "n/a | n/a | n/a | n/a | n/a"
            )
            lines.append(f"| {s['gap_s']} | {s['method']} | {s['psnr_db']:.2f} | {s['ssim']:.3f} | {perf} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "settings": self.settings,
            "summary": self.summary(),
            "rows": [r.__dict__ for r in self.rows],
            "figures": self.figures,
        }
        json_path, md_path = out_dir / "evaluation.json", out_dir / "evaluation.md"
        json_path.write_text(json.dumps(data, indent=2, default=_json_default))
        md_path.write_text(
            "# Evaluation: model vs linear interpolation vs 1 s truth\n\n"
            f"Settings: `{json.dumps(self.settings, default=_json_default)}`\n\n{self.markdown()}"
        )
        return json_path, md_path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _image_row(study: str, gap: int, method: str, candidate, truth, mask, frames) -> Row:
    m = sequence_image_metrics(candidate, truth, mask, frames)
    return Row(study, gap, method, m.psnr_db, m.ssim, m.mae_hu)


def evaluate_phantom(
    engine: Inpainter, settings: PhantomEvalSettings, out_dir: Path, say: ProgressFn = print
) -> EvaluationReport:
    from ctp_node.grid import from_model_grid, to_model_grid
    from ctp_node.perfusion import compute_perfusion
    from ctp_node.phantom import PhantomConfig, TissueLabel, generate_phantom
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    report = EvaluationReport(settings={**settings.__dict__, "engine": engine.settings.__dict__, "data": "phantom"})
    for i in range(settings.studies):
        seed = settings.seed + i
        study = generate_phantom(PhantomConfig(
            matrix=settings.matrix, slices=settings.slices, duration_s=settings.duration_s,
            noise_hu=settings.noise_hu, lesion=settings.lesion, seed=seed))  # fmt: skip
        truth = study.truth
        brain = truth.brain_mask
        voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
        reference = ReferenceMaps.by_convention(truth.cbf, truth.cbv, truth.mtt, truth.tmax, truth.parenchyma_mask)
        regions = {"grey": truth.labels == TissueLabel.GREY_MATTER, "white": truth.labels == TissueLabel.WHITE_MATTER}
        maps_1s = compute_perfusion(study.hu, study.times_s, voxel_ml, method="parametric")
        for gap in settings.gaps:
            say(f"study {i + 1}/{settings.studies} (seed {seed}), acquired every {gap} s")
            series = sample_study(study, parse_schedule(f"every:{gap}"))
            grid = to_model_grid(series)
            results = engine.inpaint_many(grid.slabs, series.times_s)
            first = results[0]
            model_hu = from_model_grid(grid, [r.sequence for r in results], first.synthetic, series, first.times_s)
            linear_hu, grid_s, synthetic = linear_inpaint(series.hu, series.times_s)
            truth_hu = study.hu[: len(grid_s)]
            outputs = {}
            for method, hu in (("model", model_hu), ("linear", linear_hu)):
                row = _image_row(f"phantom-{seed}", gap, method, hu, truth_hu, brain, synthetic)
                maps = compute_perfusion(hu, grid_s, voxel_ml, method="parametric")
                row.perfusion_vs_truth = perfusion_agreement(maps, reference, regions, voxel_ml).to_dict()
                row.perfusion_vs_1s = perfusion_agreement(maps, maps_1s, regions, voxel_ml).to_dict()
                report.rows.append(row)
                outputs[method] = (hu, maps)
            if i == 0:  # figures of the first study
                report.figures += _figures(out_dir, gap, study, truth_hu, maps_1s, outputs, synthetic, brain)
    return report


def evaluate_npy(
    engine: Inpainter, files: Sequence[Path], gaps: Sequence[int], out_dir: Path, say: ProgressFn = print
) -> EvaluationReport:
    """Published-layout sequences at 1 s (8, 192, 192, T) in 0..80 HU: image metrics per gap."""
    report = EvaluationReport(
        settings={
            "gaps": list(gaps),
            "files": [str(f) for f in files],
            "engine": engine.settings.__dict__,
            "data": "npy",
        }
    )
    for path in files:
        frames = np.moveaxis(np.load(path).astype(np.float32), -1, 0)  # (T, D, H, W)
        mask = frames.sum(axis=0) > 0
        for gap in gaps:
            say(f"{path.name}, every {gap} s")
            keep = np.arange(0, frames.shape[0], gap)
            known, times = frames[keep], keep.astype(np.float64)
            result = engine.inpaint(to_model_space(known), times)
            model = from_model_space(result.sequence)
            linear, _grid_s, synthetic = linear_inpaint(known, times)
            truth = frames[: len(synthetic)]
            report.rows.append(_image_row(path.stem, gap, "model", model, truth, mask, synthetic))
            report.rows.append(_image_row(path.stem, gap, "linear", linear, truth, mask, synthetic))
    return report


def _figures(out_dir, gap, study, truth_hu, maps_1s, candidates, synthetic, brain) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctp_node.phantom import TissueLabel

    out_dir.mkdir(parents=True, exist_ok=True)
    z = truth_hu.shape[1] // 2
    seconds = [int(s) for s in np.flatnonzero(synthetic)]
    peak = int(np.argmax(truth_hu[:, z][:, brain[z]].mean(axis=1)))
    shown = sorted(seconds, key=lambda s: abs(s - peak))[:5]
    shown.sort()
    rows = [("truth (1 s)", truth_hu), ("model", candidates["model"][0]), ("linear", candidates["linear"][0])]
    fig, axes = plt.subplots(3, len(shown), figsize=(2.4 * len(shown), 7.5), squeeze=False)
    for r, (name, hu) in enumerate(rows):
        for c, s in enumerate(shown):
            axes[r, c].imshow(np.clip(hu[s, z], 0, 80), cmap="gray", vmin=0, vmax=80)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{name}, {s} s", fontsize=8)
    fig.suptitle(f"Acquired every {gap} s: synthetic seconds near the peak (window 0..80 HU)")
    montage = out_dir / f"montage_gap{gap}.png"
    fig.savefig(montage, dpi=80)
    plt.close(fig)

    labels = study.truth.labels
    tissues = {
        "grey matter": TissueLabel.GREY_MATTER,
        "white matter": TissueLabel.WHITE_MATTER,
        "penumbra (GM)": TissueLabel.GM_PENUMBRA,
    }
    fig, axes = plt.subplots(1, len(tissues), figsize=(4.5 * len(tissues), 3.5))
    for ax, (name, label) in zip(axes, tissues.items()):
        region = labels == label
        if not region.any():
            continue
        for series_name, hu, style in (
            ("truth", truth_hu, "k-"),
            ("model", candidates["model"][0], "r-"),
            ("linear", candidates["linear"][0], "b--"),
        ):
            ax.plot(hu[:, region].mean(axis=1), style, label=series_name, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("s")
        ax.set_ylabel("HU")
        ax.legend(fontsize=7)
    curves = out_dir / f"curves_gap{gap}.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(3, 4, figsize=(12, 9), squeeze=False)
    limits = {"cbf": 80, "cbv": 6, "mtt": 16, "tmax": 14}
    for r, (name, maps) in enumerate(
        (("1 s truth series", maps_1s), ("model", candidates["model"][1]), ("linear", candidates["linear"][1]))
    ):
        for c, key in enumerate(MAPS):
            axes[r, c].imshow(getattr(maps, key)[z], cmap="jet", vmin=0, vmax=limits[key])
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{name}: {key.upper()}", fontsize=8)
    maps_png = out_dir / f"maps_gap{gap}.png"
    fig.suptitle(f"Perfusion maps, acquired every {gap} s (phantom, research use only)")
    fig.savefig(maps_png, dpi=80)
    plt.close(fig)
    return [str(montage), str(curves), str(maps_png)]
