"""Writing an analysis: maps as .npz (always) or NIfTI (SimpleITK), and a JSON summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctp_node.perfusion.maps import PerfusionMaps

MAP_NAMES = ("cbf", "cbv", "mtt", "tmax", "ttp")
MASK_NAMES = ("brain_mask", "tissue_mask", "core_mask", "hypoperfusion_mask")
# Per map, where the data support its value (``validity``): ``valid_cbf`` ... ``valid_tmax``, bool.
VALID_NAMES = tuple(f"valid_{name}" for name in ("cbf", "cbv", "mtt", "tmax"))


def valid_arrays(maps: PerfusionMaps) -> dict[str, np.ndarray]:
    """``valid_<map>`` -> (Z, Y, X) bool; empty when the analysis did not assess validity."""
    if maps.validity is None:
        return {}
    return {f"valid_{name}": mask for name, mask in maps.validity.masks().items()}


def uncertainty_arrays(maps: PerfusionMaps) -> dict[str, np.ndarray]:
    """``cbf_sd`` (mL/100 g/min, CBF's spread under the study's noise), ``cbf_sd_evaluated`` (bool: where it
    was estimated; ``perfusion.uncertainty``) and ``cbf_noise_bias`` (what was taken off CBF there, so that the
    uncorrected flow is ``cbf + cbf_noise_bias``); empty when not estimated."""
    if maps.cbf_sd is None or maps.cbf_sd_evaluated is None:
        return {}
    arrays = {"cbf_sd": maps.cbf_sd, "cbf_sd_evaluated": maps.cbf_sd_evaluated}
    if maps.cbf_noise_bias is not None:
        arrays["cbf_noise_bias"] = maps.cbf_noise_bias
    return arrays


def write_npz(path: Path, maps: PerfusionMaps) -> Path:
    names = (*MAP_NAMES, *MASK_NAMES, "aif_curve", "aif_voxels", "times_s")
    arrays = {name: getattr(maps, name) for name in names}
    if maps.severe_mask is not None:
        arrays["severe_hypoperfusion_mask"] = maps.severe_mask
    arrays |= valid_arrays(maps) | uncertainty_arrays(maps)
    selection = maps.aif_selection
    if selection is not None:
        arrays["aif_curve_uncorrected"] = selection.aif.curve
        arrays["vof_voxels"] = maps.vof_voxels
        if selection.vof is not None:
            arrays["vof_curve"] = selection.vof.curve
    np.savez_compressed(path, **arrays)
    return path


def write_nifti(
    folder: Path,
    maps: PerfusionMaps,
    spacing_mm: Sequence[float] | None,
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
) -> list[Path]:
    """One ``<name>.nii.gz`` per map and mask, with CTPSeries geometry: ``spacing_mm`` (z, y, x),
    ``origin`` (x, y, z) mm and the 3 x 3 ``direction`` (columns: x, y, z index axes), when known."""
    import SimpleITK as sitk

    written = []
    arrays = (
        {name: getattr(maps, name) for name in MAP_NAMES + MASK_NAMES} | valid_arrays(maps) | uncertainty_arrays(maps)
    )
    for name, array in arrays.items():
        image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool else array)
        if spacing_mm is not None:
            image.SetSpacing([float(s) for s in reversed(spacing_mm)])  # SimpleITK wants (x, y, z)
        if origin is not None:
            image.SetOrigin([float(v) for v in origin])
        if direction is not None:
            image.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(path))
        written.append(path)
    return written


def write_summary(path: Path, maps: PerfusionMaps, extra: dict | None = None) -> Path:
    summary = maps.summary() | (extra or {})
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
