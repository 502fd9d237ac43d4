import numpy as np
import pytest
import torch
from torch import nn

from model.baseline import linear_inpaint
from model.engine import EngineSettings, Inpainter
from model.planner import LongGapError
from model.window import from_model_space, tissue_mask, to_model_space
from tests.model.helpers import tiny_net

SHAPE = (8, 16, 16)


class InterpolationOracle(nn.Module):
    """Predicts exactly the noise that makes each target the linear interpolation of its neighbours,
    reading the weight from the local context: proves channels and contexts are wired as published."""

    def __init__(self, max_tr: int = 8) -> None:
        super().__init__()
        self.max_tr = max_tr
        self.scenarios: list[torch.Tensor] = []

    def forward(self, x, local, scenario, g):
        self.scenarios.append(scenario.clone())
        left, noisy, right = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        k = self.max_tr - 2
        w = (k * local[:, 0] + 1) / (k * local[:, 0] + k * local[:, 1] + 2)
        truth = (1 - w.reshape(-1, 1, 1, 1, 1)) * left + w.reshape(-1, 1, 1, 1, 1) * right
        gg = g.reshape(-1, 1, 1, 1, 1).double()
        return ((noisy.double() - gg * truth.double()) / torch.sqrt(1 - gg**2)).float()


def study(n: int = 5, gap: float = 4.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    hu = rng.uniform(10, 70, (n, *SHAPE)).astype(np.float32)
    hu[:, :, :2] = 0  # background rows outside the 'brain'
    return to_model_space(hu), np.arange(n) * gap


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim", "ancestral"])
def test_engine_wires_conditioning_as_published(sampler):
    volumes, times = study()
    oracle = InterpolationOracle()
    steps = 30 if sampler == "ancestral" else 6
    engine = Inpainter(
        oracle, EngineSettings(sampler=sampler, steps=steps, batch_size=5, mask_min_voxels=10), device="cpu"
    )
    result = engine.inpaint(volumes, times)
    expected, grid, synthetic = linear_inpaint(volumes, times)
    mask = tissue_mask(from_model_space(volumes), min_voxels=10)
    expected[synthetic] = np.where(mask[None], expected[synthetic], -1.0)
    np.testing.assert_allclose(result.sequence, expected, atol=2e-3)
    np.testing.assert_array_equal(result.synthetic, synthetic)
    np.testing.assert_array_equal(result.times_s, grid)
    # every target was conditioned with its planned contrast scenario
    planned = torch.tensor([t.global_context for t in result.plan.targets])
    first_pass = oracle.scenarios[0]
    torch.testing.assert_close(first_pass, planned[: len(first_pass)])


def test_known_seconds_are_returned_unchanged_and_synthetic_ones_masked():
    volumes, times = study()
    engine = Inpainter(tiny_net(), EngineSettings(steps=2, mask_min_voxels=10), device="cpu")
    result = engine.inpaint(volumes, times)
    assert result.sequence.shape == (17, *SHAPE)
    for i, t in enumerate(times):
        assert np.array_equal(result.sequence[int(t)], volumes[i])
    assert result.synthetic.sum() == 12 and not result.fallback.any()
    synthetic = result.sequence[result.synthetic]
    assert synthetic.min() >= -1 and synthetic.max() <= 1
    assert np.all(synthetic[:, ~result.tissue_mask] == -1.0)


def test_results_do_not_depend_on_batch_size():
    volumes, times = study()
    net = tiny_net()
    one = Inpainter(net, EngineSettings(steps=3, batch_size=1, mask_min_voxels=10), device="cpu").inpaint(
        volumes, times
    )
    many = Inpainter(net, EngineSettings(steps=3, batch_size=7, mask_min_voxels=10), device="cpu").inpaint(
        volumes, times
    )
    np.testing.assert_allclose(one.sequence, many.sequence, atol=5e-4)  # float32 conv order differs by batch


def test_seed_changes_samples_and_is_reproducible():
    volumes, times = study()
    net = tiny_net()
    a = Inpainter(net, EngineSettings(steps=2, seed=1, mask_min_voxels=10), device="cpu").inpaint(volumes, times)
    b = Inpainter(net, EngineSettings(steps=2, seed=1, mask_min_voxels=10), device="cpu").inpaint(volumes, times)
    c = Inpainter(net, EngineSettings(steps=2, seed=2, mask_min_voxels=10), device="cpu").inpaint(volumes, times)
    assert np.array_equal(a.sequence, b.sequence)
    assert not np.allclose(a.sequence, c.sequence)


def test_several_samples_give_a_spread_map():
    volumes, times = study(n=3)
    engine = Inpainter(tiny_net(), EngineSettings(steps=2, n_samples=3, mask_min_voxels=10), device="cpu")
    result = engine.inpaint(volumes, times)
    assert result.spread is not None and result.spread.shape == result.sequence.shape
    assert np.all(result.spread[~result.synthetic] == 0)
    assert result.spread[result.synthetic][:, result.tissue_mask].mean() > 0


def test_long_gap_policies():
    volumes, times = study(n=4)
    times = np.array([0.0, 4.0, 14.0, 18.0])
    engine = Inpainter(tiny_net(), EngineSettings(steps=2, mask_min_voxels=10), device="cpu")
    with pytest.raises(LongGapError, match="10 s"):
        engine.inpaint(volumes, times)
    linear = Inpainter(tiny_net(), EngineSettings(steps=2, long_gap="linear", mask_min_voxels=10), device="cpu")
    result = linear.inpaint(volumes, times)
    assert list(np.flatnonzero(result.fallback)) == list(range(5, 14))
    expected, _, _ = linear_inpaint(volumes, times)
    np.testing.assert_allclose(result.sequence[result.fallback], expected[result.fallback], atol=1e-6)
    assert not (result.synthetic & result.fallback).any()


def test_unusable_volume_is_replaced_by_a_synthetic_one():
    volumes, times = study()
    engine = Inpainter(tiny_net(), EngineSettings(steps=2, mask_min_voxels=10), device="cpu")
    result = engine.inpaint(volumes, times, usable=[True, True, False, True, True])
    assert result.synthetic[8] and not np.array_equal(result.sequence[8], volumes[2])
    assert result.plan.excluded_inputs == (2,)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v: v[0], "shaped"),
        (lambda v: v * 3, "model space"),
        (lambda v: np.where(v > 0.5, np.nan, v), "NaN"),
    ],
)
def test_bad_volumes_are_rejected(mutate, message):
    volumes, times = study()
    engine = Inpainter(tiny_net(), EngineSettings(steps=1, mask_min_voxels=10), device="cpu")
    with pytest.raises(ValueError, match=message):
        engine.inpaint(mutate(volumes), times)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="sampler"):
        EngineSettings(sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        EngineSettings(steps=0)


def test_progress_reports_every_volume_step():
    volumes, times = study(n=3)
    seen = []
    engine = Inpainter(tiny_net(), EngineSettings(steps=3, batch_size=4, mask_min_voxels=10), device="cpu")
    engine.inpaint(volumes, times, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (6 * 3, 6 * 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_tissue_mask_follows_the_published_rule():
    known = np.zeros((2, 8, 40, 40), np.float32)
    known[:, 1:7, 5:35, 5:35] = 30  # a 6 x 30 x 30 = 5400-voxel brain ...
    known[:, 3, 15:20, 15:20] = 0  # ... with a hole
    known[:, 0, 0, 0] = 50  # and a speck
    mask = tissue_mask(known, min_voxels=100)
    assert mask[3, 17, 17] and not mask[0, 0, 0]
    assert mask.sum() == 6 * 30 * 30
    assert not tissue_mask(known).any()  # the published 6000-voxel rule removes an object this small


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(net):
        def run(*args):
            raise RuntimeError("no C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    volumes, times = study(n=2)
    net = tiny_net()
    engine = Inpainter(net, EngineSettings(steps=1, compile=True, mask_min_voxels=10), device="cpu")
    assert engine.compiled
    with caplog.at_level("WARNING"):
        result = engine.inpaint(volumes, times)
    assert not engine.compiled and "running the network eagerly" in caplog.text
    eager = Inpainter(net, EngineSettings(steps=1, compile=False, mask_min_voxels=10), device="cpu").inpaint(
        volumes, times
    )
    np.testing.assert_array_equal(result.sequence, eager.sequence)


def test_compile_defaults_to_off_on_cpu():
    assert not Inpainter(tiny_net(), EngineSettings(), device="cpu").compiled


def test_slabs_of_one_study_share_the_sampling_passes():
    a, times = study(seed=1)
    b, _ = study(seed=2)
    oracle = InterpolationOracle()
    engine = Inpainter(oracle, EngineSettings(steps=3, batch_size=24, mask_min_voxels=10), device="cpu")
    study_result = engine.inpaint_study([a, b], times)
    results = [study_result.result(0), study_result.result(1)]
    assert len(oracle.scenarios) == 3  # 2 x 12 targets in one pass of 3 steps
    for volumes, result in zip((a, b), results):
        expected, _, synthetic = linear_inpaint(volumes, times)
        mask = tissue_mask(from_model_space(volumes), min_voxels=10)
        expected[synthetic] = np.where(mask[None], expected[synthetic], -1.0)
        np.testing.assert_allclose(result.sequence, expected, atol=2e-3)
    # the first sequence gets exactly what it would get alone
    net = tiny_net()
    together = Inpainter(net, EngineSettings(steps=2, mask_min_voxels=10), device="cpu").inpaint_study([a, b], times)
    alone = Inpainter(net, EngineSettings(steps=2, mask_min_voxels=10), device="cpu").inpaint(a, times)
    np.testing.assert_allclose(together.sequences[0], alone.sequence, atol=5e-4)


class CleanTargetOracle(InterpolationOracle):
    """The same interpolating oracle, predicting the clean target (``prediction = "x0"``)."""

    config = type("Config", (), {"prediction": "x0"})()

    def forward(self, x, local, scenario, g):
        eps = super().forward(x, local, scenario, g)
        gg = g.reshape(-1, 1, 1, 1, 1)
        return (x[:, 1:2] - torch.sqrt(1 - gg**2) * eps) / gg


@pytest.mark.parametrize(
    ("oracle", "settings"),
    [
        (CleanTargetOracle(), {"sampler": "ddim", "steps": 4}),
        (CleanTargetOracle(), {"sampler": "dpmpp_2m", "steps": 1}),
    ],
)
def test_clean_target_networks_sample_the_same_oracle_answer(oracle, settings):
    volumes, times = study()
    engine = Inpainter(oracle, EngineSettings(batch_size=5, mask_min_voxels=10, **settings), device="cpu")
    result = engine.inpaint(volumes, times)
    expected, _grid, synthetic = linear_inpaint(volumes, times)
    mask = tissue_mask(from_model_space(volumes), min_voxels=10)
    expected[synthetic] = np.where(mask[None], expected[synthetic], -1.0)
    np.testing.assert_allclose(result.sequence, expected, atol=2e-3)


def test_a_study_is_planned_once_and_each_slab_conditioned_on_its_own_peak():
    """One record of what fills each second for the whole study; the scenario follows each slab's frame sums."""
    a, times = study(seed=1)
    b = a.copy()
    b[0], b[1] = 1.0, 0.9  # slab b: its two brightest volumes are the first two, so its peak is second 2

    result = Inpainter(tiny_net(), EngineSettings(steps=1, mask_min_voxels=10), device="cpu").inpaint_study(
        [a, b], times
    )
    assert result.plans[0].fill is result.fill and result.plans[1].fill is result.fill
    assert result.plans[0].peak_second != result.plans[1].peak_second
    assert [f.kind for f in result.fill.fills] == [
        "acquired" if s in result.fill.known_seconds else "synthetic" for s in result.fill.seconds
    ]
    assert np.array_equal(result.result(1).synthetic, result.fill.synthetic)


def _schedule_checkpoint(tmp_path, schedule):
    from model.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "net.pt", tiny_net(), schedule=schedule)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_the_checkpoint_schedule_is_the_one_sampled_with(tmp_path, sampler):
    from model.checkpoint import load_denoiser
    from model.samplers import ScheduleSpec

    cosine = {"schedule": "cosine", "timesteps": 1000, "beta_start": 1e-6, "beta_end": 1e-2}
    loaded = load_denoiser(_schedule_checkpoint(tmp_path, cosine))
    assert loaded.info.noise_schedule == ScheduleSpec("cosine", 1000, 1e-6, 1e-2)
    volumes, times = study()
    settings = EngineSettings(sampler=sampler, steps=3, mask_min_voxels=10)
    from_checkpoint = Inpainter(loaded, settings, device="cpu").inpaint(volumes, times)
    default = Inpainter(loaded.net, settings, device="cpu").inpaint(volumes, times)
    explicit = Inpainter(loaded.net, settings, device="cpu", schedule=ScheduleSpec("cosine", 1000)).inpaint(
        volumes, times
    )
    synthetic = from_checkpoint.synthetic
    assert np.abs(from_checkpoint.sequence[synthetic] - default.sequence[synthetic]).max() > 1e-3
    np.testing.assert_array_equal(from_checkpoint.sequence, explicit.sequence)


def test_published_and_unrecorded_schedules_are_the_published_default(tmp_path, seed_dir):
    from model.checkpoint import load_denoiser
    from model.samplers import ScheduleSpec

    assert load_denoiser(seed_dir / "seed_format_tiny_checkpoint.pt").info.noise_schedule == ScheduleSpec()
    assert load_denoiser(_schedule_checkpoint(tmp_path, {})).info.noise_schedule == ScheduleSpec()


def test_an_invalid_recorded_schedule_is_refused(tmp_path):
    from model.checkpoint import CheckpointError, load_denoiser

    with pytest.raises(CheckpointError, match="not a noise schedule"):
        load_denoiser(_schedule_checkpoint(tmp_path, {"schedule": "linear", "timesteps": "many"}))
