"""`PhantomConfig`: every knob of the digital CTP phantom, validated when it is built.

A frozen dataclass rather than a settings model: it is a value passed to a pure function, compared
and hashed in tests, and built from CLI options. Invalid combinations fail here, with a message that
says which value to change, instead of producing a silently wrong study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# The head's geometry lives with the anatomy (it draws the head); it is read here to check lesion
# placement. anatomy.py and motion.py import nothing from this module, so the imports run one way.
from ctp_node.phantom.anatomy import HEAD_CENTRE_Z_MM, INTRACRANIAL_SEMI_AXES_MM, MCA_TERRITORY_MIN_ABS_X_MM
from ctp_node.phantom.motion import SliceMotion

Residue = Literal["exponential", "box"]
RESIDUES: tuple[str, ...] = ("exponential", "box")


@dataclass(frozen=True)
class PhantomConfig:
    """Parameters of one simulated CTP study.

    Geometry: ``matrix`` x ``matrix`` pixels over ``fov_mm`` (512 is realistic at 0.47 mm pixels,
    192 is the model grid), ``slices`` slices of ``slice_thickness_mm`` centred on the level of the
    basal ganglia (z = 0 mm). Time: ``duration_s`` volumes at t = 0, 1, ..., duration_s - 1 s.

    Perfusion: ``residue`` selects the residue function; ``perfusion_variation`` is the relative
    standard deviation of the smooth per-voxel CBF and MTT fields, ``delay_variation_s`` that of the
    bolus delay, ``baseline_variation_hu`` that of the unenhanced HU.

    Lesion (``lesion=True``): an ischaemic core (sphere of ``lesion_core_radius_mm``) inside a
    penumbra (sphere of ``lesion_penumbra_radius_mm``) around ``lesion_centre_mm`` (x, y, z, patient
    LPS: +x is the patient's left), restricted to the MCA territory of that hemisphere.

    Noise: ``noise_hu`` is the standard deviation of each voxel's noise in HU on the native grid;
    noise is Gaussian, filtered in-plane with a Gaussian of ``noise_correlation_mm`` (sigma). Because
    neighbours are correlated, the std inside small patches is lower: about 0.83 ``noise_hu`` in
    8 x 8 patches at 512 x 512 (0.47 mm pixels), so ``noise_hu=10`` reproduces the 8-9 HU measured in
    such patches on real 80 kVp CTP.

    Motion: volumes listed in ``motion_volumes`` show the head moved rigidly by up to
    ``motion_translation_mm`` per axis and ``motion_rotation_deg`` per axis (uniformly drawn).
    ``slice_motions`` (``phantom.motion.SliceMotion``) record some slices of a volume in another pose
    (a step between slices, a shifted slice, blur of motion during the acquisition): motion that
    registering whole volumes cannot undo.

    Partial volume: with ``supersample`` k > 1 each pixel is the mean of k x k sub-pixels (as a
    detector integrates), so an edge moved by a fraction of a pixel changes the pixel's value
    instead of jumping a whole pixel; motion studies need it to tell interpolation from
    misalignment. 1 (default) samples each voxel at its centre; k times k times slower.
    """

    matrix: int = 192
    slices: int = 8
    slice_thickness_mm: float = 5.0
    fov_mm: float = 240.0
    duration_s: int = 61
    noise_hu: float = 0.0
    noise_correlation_mm: float = 0.7
    lesion: bool = True
    lesion_centre_mm: tuple[float, float, float] = (40.0, -5.0, 5.0)
    lesion_core_radius_mm: float = 12.0
    lesion_penumbra_radius_mm: float = 28.0
    residue: Residue = "exponential"
    perfusion_variation: float = 0.1
    delay_variation_s: float = 0.3
    baseline_variation_hu: float = 3.0
    seed: int = 0
    motion_volumes: tuple[int, ...] = field(default=())
    motion_translation_mm: float = 3.0
    motion_rotation_deg: float = 3.0
    slice_motions: tuple[SliceMotion, ...] = field(default=())
    supersample: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "motion_volumes", tuple(int(v) for v in self.motion_volumes))
        object.__setattr__(self, "slice_motions", tuple(self.slice_motions))
        object.__setattr__(self, "lesion_centre_mm", tuple(float(v) for v in self.lesion_centre_mm))
        for problem in self._problems():
            raise ValueError(f"invalid PhantomConfig: {problem}")

    @property
    def pixel_mm(self) -> float:
        """In-plane pixel spacing (square pixels)."""
        return self.fov_mm / self.matrix

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(z, y, x) voxel spacing in mm."""
        return (self.slice_thickness_mm, self.pixel_mm, self.pixel_mm)

    @property
    def slab_mm(self) -> tuple[float, float]:
        """(lowest, highest) z of the imaged slab's outer faces."""
        half = self.slices * self.slice_thickness_mm / 2.0
        return (-half, half)

    def _problems(self) -> list[str]:
        problems = []
        if not isinstance(self.matrix, int) or self.matrix < 32:
            problems.append(f"matrix must be an integer >= 32, got {self.matrix!r}")
        if not isinstance(self.slices, int) or self.slices < 1:
            problems.append(f"slices must be a positive integer, got {self.slices!r}")
        if not isinstance(self.duration_s, int) or self.duration_s < 2:
            problems.append(
                f"duration_s must be an integer number of seconds >= 2 (one volume per second), got {self.duration_s!r}"
            )
        for name in ("slice_thickness_mm", "fov_mm", "noise_correlation_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.noise_hu) and self.noise_hu >= 0):
            problems.append(f"noise_hu must be >= 0 HU, got {self.noise_hu!r}")
        if self.residue not in RESIDUES:
            problems.append(f"residue must be one of {RESIDUES}, got {self.residue!r}")
        if not (isinstance(self.supersample, int) and 1 <= self.supersample <= 8):
            problems.append(f"supersample must be an integer within 1..8, got {self.supersample!r}")
        if not 0 <= self.perfusion_variation <= 0.3:
            problems.append(f"perfusion_variation must be within 0..0.3, got {self.perfusion_variation!r}")
        if not 0 <= self.delay_variation_s <= 2:
            problems.append(f"delay_variation_s must be within 0..2 s, got {self.delay_variation_s!r}")
        if not 0 <= self.baseline_variation_hu <= 10:
            problems.append(f"baseline_variation_hu must be within 0..10 HU, got {self.baseline_variation_hu!r}")
        if self.motion_translation_mm < 0 or self.motion_rotation_deg < 0:
            problems.append("motion_translation_mm and motion_rotation_deg must be >= 0")
        if isinstance(self.duration_s, int):
            bad = [v for v in self.motion_volumes if not 0 <= v < self.duration_s]
            if bad:
                problems.append(f"motion_volumes {bad} outside 0..{self.duration_s - 1}")
            if len(set(self.motion_volumes)) != len(self.motion_volumes):
                problems.append(f"motion_volumes lists a volume twice: {self.motion_volumes}")
            if isinstance(self.slices, int):
                for motion in self.slice_motions:
                    problems.extend(motion.problems(self.duration_s, self.slices))
        if self.lesion and not problems:
            problems.extend(self._lesion_problems())
        return problems

    def _lesion_problems(self) -> list[str]:
        x, y, z = self.lesion_centre_mm
        core, penumbra = self.lesion_core_radius_mm, self.lesion_penumbra_radius_mm
        if not 0 < core < penumbra:
            return [
                f"lesion needs 0 < lesion_core_radius_mm < lesion_penumbra_radius_mm "
                f"(the penumbra surrounds the core), got {core} and {penumbra}"
            ]
        ax, ay, az = INTRACRANIAL_SEMI_AXES_MM
        if (x / ax) ** 2 + (y / ay) ** 2 + ((z - HEAD_CENTRE_Z_MM) / az) ** 2 >= 0.8**2:
            return [f"lesion_centre_mm {self.lesion_centre_mm} is not inside the brain; move it towards (±40, -5, 5)"]
        if abs(x) < MCA_TERRITORY_MIN_ABS_X_MM + core / 2:
            return [
                f"lesion_centre_mm x = {x} mm is not in an MCA territory; use |x| >= "
                f"{MCA_TERRITORY_MIN_ABS_X_MM + core / 2:g} mm (+x: patient left, -x: right)"
            ]
        low, high = self.slab_mm
        if z + core <= low or z - core >= high:
            return [
                f"the lesion core (z = {z - core:g}..{z + core:g} mm) lies outside the imaged slab "
                f"(z = {low:g}..{high:g} mm); move lesion_centre_mm or image more slices"
            ]
        return []
