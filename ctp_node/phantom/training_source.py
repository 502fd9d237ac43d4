"""Phantom studies for the trainer: the digital phantom as a ``training.datasets.StudySource``.

The trainer knows nothing of the phantom; ``ctp-node train`` passes :class:`PhantomStudies` built
from the configuration's ``[data.phantom]`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ctp_node.phantom.config import PhantomConfig
from ctp_node.phantom.generator import PhantomStudy, generate_phantom
from model.window import WINDOW_HIGH_HU, WINDOW_LOW_HU
from training.config import PhantomDataConfig
from training.datasets import DrawnStudy

SLICE_MM = PhantomConfig.slice_thickness_mm  # where a lesion may sit in the slab


@dataclass(frozen=True)
class PhantomStudies:
    """Draws random phantom studies in the published layout (a picklable StudySource).

    Random per study: smooth perfusion/delay/baseline fields (seed), lesion presence, size and place
    in an MCA territory, noise level and texture, field of view, duration and the bolus onset
    (leading seconds cut off).
    """

    config: PhantomDataConfig

    def __call__(self, rng: np.random.Generator) -> np.ndarray | DrawnStudy:
        """One study (slices, matrix, matrix, T) at 1 s, windowed 0..80 HU, 0 outside the brain;
        with ``noise_free_target``, together with the same study generated without noise."""
        config = self.config
        duration = int(rng.integers(config.duration_s[0], config.duration_s[1] + 1))
        shift = int(rng.integers(config.onset_shift_s[0], config.onset_shift_s[1] + 1))
        core = float(rng.uniform(8.0, 14.0))
        slab_half = config.slices * SLICE_MM / 2.0
        phantom = PhantomConfig(
            matrix=config.matrix,
            slices=config.slices,
            duration_s=duration + shift,
            noise_hu=float(rng.uniform(*config.noise_hu)),
            noise_correlation_mm=float(rng.uniform(*config.noise_correlation_mm)),
            fov_mm=float(rng.uniform(*config.fov_mm)),
            lesion=bool(rng.random() < config.lesion_probability),
            lesion_centre_mm=(
                float(rng.choice([-1.0, 1.0]) * rng.uniform(32.0, 45.0)),
                float(rng.uniform(-15.0, 5.0)),
                float(rng.uniform(-0.5, 0.5) * slab_half),
            ),
            lesion_core_radius_mm=core,
            lesion_penumbra_radius_mm=core + float(rng.uniform(8.0, 16.0)),
            perfusion_variation=float(rng.uniform(0.05, 0.2)),
            delay_variation_s=float(rng.uniform(0.0, 1.0)),
            baseline_variation_hu=float(rng.uniform(1.0, 5.0)),
            seed=int(rng.integers(2**31 - 1)),
        )
        frames = _published_layout(generate_phantom(phantom), shift)
        if not config.noise_free_target:
            return frames
        # Same seed: the same anatomy, fields and lesion; only the noise is left out.
        return DrawnStudy(frames, _published_layout(generate_phantom(replace(phantom, noise_hu=0.0)), shift))


def _published_layout(study: PhantomStudy, shift: int) -> np.ndarray:
    """(slices, matrix, matrix, T) windowed 0..80 HU, 0 outside the brain, leading ``shift`` s dropped."""
    hu = np.where(study.truth.brain_mask[None], study.hu, np.float32(0.0))[shift:]
    windowed = np.clip(hu, WINDOW_LOW_HU, WINDOW_HIGH_HU).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(windowed, 0, -1))
