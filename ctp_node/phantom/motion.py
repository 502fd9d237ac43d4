"""Rigid head motion between volumes.

A moved volume is rendered by evaluating the analytic head on a moved grid (anatomy.Grid), not by
interpolating an image: the result is as sharp as an unmoved volume, which is what a scanner would
record, and through-plane motion shows the anatomy a 5 mm slice really would contain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.phantom.anatomy import Grid


@dataclass(frozen=True)
class RigidMotion:
    """Head pose of one volume: rotation (degrees about x, y, z through ``centre_mm``), then translation."""

    volume: int
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def rotation(self) -> np.ndarray:
        """3x3 rotation matrix R = Rz @ Ry @ Rx."""
        ax, ay, az = np.radians(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def head_point(self, patient_mm: np.ndarray) -> np.ndarray:
        """Where in the unmoved head the scanner point ``patient_mm`` (3, N) lies."""
        c = np.asarray(self.centre_mm)[:, None]
        return self.rotation().T @ (patient_mm - c - np.asarray(self.translation_mm)[:, None]) + c


def draw_motions(
    rng: np.random.Generator, volumes: tuple[int, ...], translation_mm: float, rotation_deg: float
) -> tuple[RigidMotion, ...]:
    """One random pose per listed volume, each component uniform in +-the given maximum."""
    return tuple(
        RigidMotion(
            volume=v,
            rotation_deg=tuple(float(a) for a in rng.uniform(-rotation_deg, rotation_deg, 3)),
            translation_mm=tuple(float(t) for t in rng.uniform(-translation_mm, translation_mm, 3)),
        )
        for v in volumes
    )


def moved_grid(grid: Grid, motion: RigidMotion) -> Grid:
    """The grid, expressed in the unmoved head's frame, that a moved head presents to the scanner."""
    linear = motion.rotation().T @ grid.affine[:, :3]
    offset = motion.head_point(grid.affine[:, 3:4])[:, 0]
    return Grid(grid.shape, np.concatenate([linear, offset[:, None]], axis=1))


@dataclass(frozen=True)
class SliceMotion:
    """Slices ``first_slice..last_slice`` (inclusive) of ``volume`` recorded with the head in another pose.

    Motion that registering whole volumes cannot undo. The pose (rotation in degrees about x, y, z
    through ``centre_mm``, then translation, relative to the unmoved head) replaces the volume's
    own pose (unmoved, or its ``RigidMotion``) in those slices:

    - ``sweep_steps == 1``: the head moved between the acquisition of the other slices and of these
      (shuttle/helical perfusion, or a slice reconstructed at the wrong position): a step between
      slices, or a single shifted slice when ``first_slice == last_slice``;
    - ``sweep_steps > 1``: the head moved during these slices' acquisition, from the volume's pose to
      this one; they show the mean of ``sweep_steps`` poses evenly spaced along the way (the blur
      of motion within one gantry rotation, without its streaks).
    """

    volume: int
    first_slice: int
    last_slice: int
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sweep_steps: int = 1

    def poses(self, start: RigidMotion | None = None) -> tuple[RigidMotion, ...]:
        """The pose(s) whose mean these slices show; a sweep starts at ``start`` (None: unmoved)."""
        end = np.array([*self.rotation_deg, *self.translation_mm], dtype=np.float64)
        begin = np.zeros(6) if start is None else np.array([*start.rotation_deg, *start.translation_mm])
        fractions = [1.0] if self.sweep_steps == 1 else np.linspace(0.0, 1.0, self.sweep_steps)
        out = []
        for f in fractions:
            p = begin + f * (end - begin)
            out.append(RigidMotion(self.volume, tuple(p[:3]), tuple(p[3:]), self.centre_mm))
        return tuple(out)

    def problems(self, duration_s: int, slices: int) -> list[str]:
        """What is wrong with this motion for a study of ``duration_s`` volumes and ``slices`` slices."""
        out = []
        if not 0 <= self.volume < duration_s:
            out.append(f"slice motion volume {self.volume} outside 0..{duration_s - 1}")
        if not 0 <= self.first_slice <= self.last_slice < slices:
            out.append(
                f"slice motion slices {self.first_slice}..{self.last_slice}: need 0 <= first <= last <= {slices - 1}"
            )
        if not (isinstance(self.sweep_steps, int) and self.sweep_steps >= 1):
            out.append(f"slice motion sweep_steps must be an integer >= 1, got {self.sweep_steps!r}")
        return out
