"""One PNG that shows a perfusion analysis at a glance: maps, lesion overlay, time-attenuation curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctp_node.perfusion.maps import PerfusionMaps

FIGSIZE_IN = (15.0, 8.0)
DPI = 100  # 1500 x 800 pixels


def _display_slice(maps: PerfusionMaps) -> int:
    """The slice with the most hypoperfused tissue, else the one with the most brain."""
    per_slice = maps.hypoperfusion_mask.sum(axis=(1, 2))
    if per_slice.max() == 0:
        per_slice = maps.brain_mask.sum(axis=(1, 2))
    return int(np.argmax(per_slice))


def _upper(volume: np.ndarray, mask: np.ndarray, fallback: float) -> float:
    values = volume[mask]
    top = float(np.percentile(values, 98)) if values.size else 0.0
    return top if top > 0 else fallback


def mean_curves(hu: np.ndarray, maps: PerfusionMaps) -> dict[str, np.ndarray]:
    """Mean time-attenuation curves (HU) of normal tissue, hypoperfused tissue and core."""
    regions = {
        "normal tissue": maps.tissue_mask & ~maps.hypoperfusion_mask,
        "hypoperfused (Tmax > 6 s), not core": maps.hypoperfusion_mask & ~maps.core_mask,
        "core": maps.core_mask,
    }
    flat = hu.reshape(hu.shape[0], -1)
    return {name: flat[:, mask.reshape(-1)].mean(axis=1) for name, mask in regions.items() if mask.any()}


def save_figure(path: Path, hu: np.ndarray, maps: PerfusionMaps, title: str = "") -> Path:
    """Write the overview PNG (matplotlib Agg, FIGSIZE_IN at DPI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = _display_slice(maps)
    brain = maps.brain_mask[z]
    # Flow, volume and transit time scale with the method's bias, so their ranges follow the data
    # (98th percentile in tissue); Tmax keeps a fixed scale around its 6 s and 10 s thresholds.
    panels = [
        ("CBF (mL/100 g/min)", maps.cbf[z], (0.0, _upper(maps.cbf, maps.tissue_mask, 80.0))),
        ("CBV (mL/100 g)", maps.cbv[z], (0.0, _upper(maps.cbv, maps.tissue_mask, 6.0))),
        ("MTT (s)", maps.mtt[z], (0.0, _upper(maps.mtt, maps.tissue_mask, 16.0))),
        ("Tmax (s)", maps.tmax[z], (0.0, 14.0)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE_IN, dpi=DPI)
    for ax, (name, image, (lo, hi)) in zip(axes.flat[:4], panels, strict=True):
        shown = ax.imshow(np.where(brain, image, np.nan), cmap="jet", vmin=lo, vmax=hi)
        ax.set_title(name)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    ax = axes.flat[4]
    baseline = hu[maps.baseline_frames].mean(axis=0)[z]
    ax.imshow(baseline, cmap="gray", vmin=0, vmax=80)
    overlay = np.zeros((*baseline.shape, 4))
    overlay[maps.hypoperfusion_mask[z]] = (0.1, 0.4, 1.0, 0.5)
    overlay[maps.core_mask[z]] = (1.0, 0.1, 0.1, 0.7)
    aif_here = maps.aif_voxels[maps.aif_voxels[:, 0] == z]
    ax.imshow(overlay)
    ax.plot(aif_here[:, 2], aif_here[:, 1], "y+", markersize=6)
    volumes = ""
    if maps.voxel_volume_ml is not None:
        # A withheld volume reads "withheld", never a number the analysis does not stand behind.
        reported = (maps.core_volume_ml, maps.hypoperfusion_volume_ml)
        shown = [f"{v:.1f} mL" if v is not None else "withheld" for v in reported]
        volumes = f": core {shown[0]}, Tmax>6 s {shown[1]}"
    ax.set_title(f"core (red), hypoperfusion (blue), AIF (+){volumes}", fontsize=9)
    ax.axis("off")
    ax = axes.flat[5]
    for name, curve in mean_curves(hu, maps).items():
        ax.plot(maps.times_s, curve - curve[maps.baseline_frames].mean(), label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tissue enhancement (HU)")
    twin = ax.twinx()
    twin.plot(maps.times_s, maps.aif_curve, "k--", label="AIF")
    twin.set_ylabel("AIF enhancement (HU)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("mean time-attenuation curves")
    fig.suptitle(f"{title}  slice {z}, {maps.method}, Tmax > 6 s / rCBF < 30 % of {maps.reference_cbf:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
