"""Small phantom studies shared by the phantom tests (generated once per session: a few seconds)."""

from __future__ import annotations

import pytest

from ctp_node.phantom import PhantomConfig, PhantomStudy, generate_phantom

SMALL = PhantomConfig(matrix=64, slices=3, duration_s=16, noise_hu=4.0, seed=3)


@pytest.fixture(scope="session")
def small_study() -> PhantomStudy:
    """64 x 64 x 3 slices x 16 s with noise and lesion: fast enough for every writer combination."""
    return generate_phantom(SMALL)


@pytest.fixture(scope="session")
def clean_study() -> PhantomStudy:
    """96 x 96 x 4 slices x 40 s, no noise, class values without variation: for curve checks."""
    return generate_phantom(
        PhantomConfig(
            matrix=96,
            slices=4,
            duration_s=40,
            noise_hu=0.0,
            perfusion_variation=0.0,
            delay_variation_s=0.0,
            baseline_variation_hu=0.0,
        )
    )
