"""A checkpoint's recommended sampler and steps: stored, read, stamped, and how the node chooses."""

import pytest
import torch

from model.checkpoint import (
    DEMO_WEIGHTS,
    CheckpointError,
    SamplerRecommendation,
    load_denoiser,
    read_checkpoint,
    save_checkpoint,
    set_recommended_sampler,
)
from model.engine import DEFAULT_SAMPLER, DEFAULT_STEPS, ProgressLog, choose_sampling
from tests.model.helpers import published_state, tiny_net


def test_a_saved_recommendation_loads_with_the_network(tmp_path):
    path = save_checkpoint(tmp_path / "net.pt", tiny_net(), recommended=SamplerRecommendation("ddim", 3))
    assert read_checkpoint(path).recommended == SamplerRecommendation("ddim", 3)
    loaded = load_denoiser(path)
    assert loaded.info.to_dict()["recommended"] == {"sampler": "ddim", "steps": 3}  # plain data: JSON sidecars
    assert loaded.info.recommended == SamplerRecommendation("ddim", 3)
    assert not hasattr(loaded.net, "checkpoint_info")  # metadata travels beside the network, not on it


def test_old_and_published_checkpoints_load_unchanged_without_one(tmp_path):
    own = save_checkpoint(tmp_path / "old.pt", tiny_net())
    published = tmp_path / "published.pt"
    torch.save({"step": 3, "ema": published_state(tiny_net())}, published)
    for path in (own, published):
        assert read_checkpoint(path).recommended is None
        assert load_denoiser(path).info.recommended is None


def test_stamping_changes_the_recommendation_and_nothing_else(tmp_path):
    path = save_checkpoint(tmp_path / "net.pt", tiny_net(), step=7, extra={"exported_from": "run"})
    before = read_checkpoint(path)
    set_recommended_sampler(path, "dpmpp_2m", 8)
    after = read_checkpoint(path)
    assert after.recommended == SamplerRecommendation("dpmpp_2m", 8)
    assert after.step == 7 and after.raw["exported_from"] == "run" and after.config == before.config
    assert all(torch.equal(before.state_dict[k], after.state_dict[k]) for k in before.state_dict)
    set_recommended_sampler(path, "ddim", 2)  # re-stamping replaces
    assert read_checkpoint(path).recommended == SamplerRecommendation("ddim", 2)
    assert not (tmp_path / "net.pt.tmp").exists()


def test_stamping_refuses_published_files_and_invalid_values(tmp_path):
    published = tmp_path / "published.pt"
    torch.save({"ema": published_state(tiny_net())}, published)
    with pytest.raises(CheckpointError, match="not a ctp-node checkpoint"):
        set_recommended_sampler(published, "ddim", 2)
    own = save_checkpoint(tmp_path / "own.pt", tiny_net())
    with pytest.raises(CheckpointError, match="sampler 'euler'"):
        set_recommended_sampler(own, "euler", 2)
    with pytest.raises(CheckpointError, match="steps"):
        set_recommended_sampler(own, "ddim", 0)
    assert read_checkpoint(own).recommended is None  # nothing was written


@pytest.mark.parametrize(
    "stored, match",
    [
        ({"recommended_sampler": "ddim"}, "together"),
        ({"recommended_steps": 2}, "together"),
        ({"recommended_sampler": "ddim", "recommended_steps": "2"}, "steps"),
        ({"recommended_sampler": "heun", "recommended_steps": 2}, "heun"),
    ],
)
def test_a_broken_recommendation_in_a_file_is_an_error(tmp_path, stored, match):
    path = save_checkpoint(tmp_path / "net.pt", tiny_net())
    raw = torch.load(path, weights_only=True)
    torch.save(raw | stored, path)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):  # and save_checkpoint never writes one
        save_checkpoint(tmp_path / "other.pt", tiny_net(), extra=stored)


def test_the_shipped_demo_weights_recommend_ddim_2():
    assert read_checkpoint(DEMO_WEIGHTS).recommended == SamplerRecommendation("ddim", 2)


DDIM2 = SamplerRecommendation("ddim", 2)


@pytest.mark.parametrize(
    "sampler, steps, recommended, expected",
    [
        (None, None, DDIM2, ("ddim", 2, "checkpoint's recommendation")),
        (None, None, None, (DEFAULT_SAMPLER, DEFAULT_STEPS, "default")),
        ("dpmpp_2m", 10, DDIM2, ("dpmpp_2m", 10, "given")),
        (None, 5, DDIM2, ("ddim", 5, "sampler checkpoint's recommendation, steps given")),
        ("ddim", None, DDIM2, ("ddim", 2, "sampler given, steps checkpoint's recommendation")),
        # steps tuned for DDIM do not carry over to another sampler
        ("dpmpp_2m", None, DDIM2, ("dpmpp_2m", DEFAULT_STEPS, "sampler given, steps default")),
        ("ancestral", None, None, ("ancestral", DEFAULT_STEPS, "sampler given, steps default")),
    ],
)
def test_choose_sampling(sampler, steps, recommended, expected):
    choice = choose_sampling(sampler, steps, recommended)
    assert (choice.sampler, choice.steps, choice.source) == expected


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_log_writes_every_10_percent_or_10_seconds_and_at_the_end():
    lines, clock = [], Clock()
    progress = ProgressLog(lines.append, "series x", steps=2, every_s=10, every_fraction=0.25, clock=clock)
    total = 40 * 2  # 40 targets, 2 steps each
    clock.now += 1
    progress(2, total)  # 2.5 %, 1 s: nothing yet
    assert lines == []
    clock.now += 11
    progress(4, total)  # 12 s since the start: a line
    clock.now += 1
    progress(6, total)
    progress(24, total)  # 30 %: a line
    clock.now += 8
    progress(80, total)  # the end: always a line, once
    progress(80, total)
    assert len(lines) == 3
    assert lines[0].startswith("series x: 2/40 targets (5%), elapsed 12 s, ETA 228 s")
    assert lines[1].startswith("series x: 12/40 targets (30%)")
    assert lines[2] == "series x: 40/40 targets (100%), elapsed 21 s, ETA 0 s"
