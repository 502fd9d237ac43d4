"""Studies drawn on the fly: the digital phantom as the trainer's StudySource, and the stream itself."""

import itertools

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctp_node.phantom.training_source import PhantomStudies
from model.window import from_model_space
from training.config import parse_config
from training.datasets import DataError, DrawnStudy, StudyStream, draw_sequence, drawn_validation, make_item
from training.trainer import train

from .helpers import TINY_NETWORK, bolus_sequence

PHANTOM = {
    "matrix": 32,
    "slices": 8,
    "duration_s": [18, 22],
    "onset_shift_s": [4, 6],
    "samples_per_study": 3,
    "val_studies": 1,
}


def phantom_config(output, **runtime):
    return parse_config(
        {
            "network": TINY_NETWORK,
            "diffusion": {"timesteps": 100},
            "data": {"kind": "phantom", "max_tr": 4, "phantom": PHANTOM},
            "optim": {"batch_size": 2, "iterations": 2},
            "runtime": {"num_workers": 0, "progress": False, "output": str(output), "sample_steps": 2, **runtime},
        }
    )


def test_phantom_frames_are_skull_stripped_windowed_published_layout():
    frames = PhantomStudies(phantom_config("x").data.phantom)(np.random.default_rng(0))
    assert frames.shape[:3] == (8, 32, 32) and 18 <= frames.shape[3] <= 22 and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 80
    outside = frames.sum(axis=-1) == 0
    assert outside[:, 0, 0].all() and 0.2 < outside.mean() < 0.9  # air and skull are 0, the brain is not
    sums = frames.sum(axis=(0, 1, 2))
    assert sums.argmax() > 5 and sums.max() > 1.2 * sums[0]  # the bolus arrives within the kept seconds


def test_noise_free_target_is_the_same_study_without_noise_and_only_the_target_is_clean():
    cfg = phantom_config("x").data
    noisy = PhantomStudies(cfg.phantom.model_copy(update={"noise_hu": (6.0, 6.0)}))
    clean = PhantomStudies(cfg.phantom.model_copy(update={"noise_hu": (6.0, 6.0), "noise_free_target": True}))
    measured = noisy(np.random.default_rng(3))
    drawn = clean(np.random.default_rng(3))
    assert isinstance(drawn, DrawnStudy) and drawn.noise_free is not None
    np.testing.assert_array_equal(drawn.frames, measured)  # the measured study is unchanged by the option
    brain = measured > 0
    residual = (measured - drawn.noise_free)[brain]
    assert 4.0 < residual.std() < 8.0 and abs(residual.mean()) < 0.5  # what differs is the 6 HU noise alone

    sequence = draw_sequence(clean, cfg, np.random.default_rng(3), "s")
    sample = sequence.samples[len(sequence.samples) // 2]
    item = make_item(sequence.frames, sample, False, sequence.targets)
    plain = make_item(sequence.frames, sample, False)
    assert torch.equal(item.x[0], plain.x[0]) and torch.equal(item.x[2], plain.x[2])  # conditions stay noisy
    expected = make_item(sequence.targets, sample, False).x[1]
    assert torch.equal(item.x[1], expected) and not torch.equal(item.x[1], plain.x[1])


class _CodedStudies:
    """A study whose voxels say where they are (so a crop's place shows), a bolus common to all, and a
    'noise-free' version 1 HU above it."""

    def __call__(self, rng):
        d, h, w = np.meshgrid(np.arange(8), np.arange(32), np.arange(32), indexing="ij")
        code = ((7 * h + 3 * w + 11 * d) % 80 * 0.5).astype(np.float32)[..., None]
        curve = (30.0 * np.exp(-(((np.arange(20) - 10) / 3.0) ** 2))).astype(np.float32)
        frames = code + curve + 5.0
        return DrawnStudy(frames, frames + 1.0)


def test_stream_crops_the_noise_free_target_at_the_place_of_its_conditions():
    cfg = phantom_config("x").data
    config = cfg.model_copy(update={"phantom": cfg.phantom.model_copy(update={"crop": 16})})
    for item in itertools.islice(StudyStream(config, _CodedStudies(), seed=0), 6):
        hu = from_model_space(item.x.numpy())
        assert hu.shape == (3, 8, 16, 16)
        step = hu[1] - hu[0]  # bolus difference + 1 HU: the same everywhere only if the crops coincide
        assert np.ptp(step) < 1e-3


def test_phantom_stream_yields_model_space_items_and_differs_per_rank():
    cfg = phantom_config("x").data
    studies = PhantomStudies(cfg.phantom)
    items = list(itertools.islice(StudyStream(cfg, studies, seed=0, rank=0), 4))
    for item in items:
        assert item.x.shape == (3, 8, 32, 32) and item.x.min() >= -1 and item.x.max() <= 1
        assert item.local_context.min() >= 0 and item.local_context.max() <= 1
        assert item.global_context.sum() == 1
    other = next(iter(StudyStream(cfg, studies, seed=0, rank=1)))
    assert not torch.equal(items[0].x, other.x)
    validation = drawn_validation(cfg, studies)
    assert validation is not None and len(validation.sequences) == 1


def test_training_on_phantoms_logs_validation_loss_and_sample_images(tmp_path):
    cfg = phantom_config(tmp_path / "run", val_every=2, sample_every=2, val_batches=1)
    result = train(cfg, studies=PhantomStudies(cfg.data.phantom))
    assert result.step == 2 and np.isfinite(result.last_loss)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss_ema"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["samples/left_target_right_prediction"]
    image = events.Images("samples/left_target_right_prediction")[0]
    assert (image.width, image.height) == (4 * 32, 32)


def test_crops_are_centred_on_brain_and_stay_inside_the_plane():
    from training.datasets import brain_pixels, crop_around

    frames = np.zeros((2, 40, 50, 3), np.float32)
    frames[:, 30:35, 40:45, 0] = 20.0  # the only brain pixels
    inside = brain_pixels(frames)
    assert inside.min(axis=0).tolist() == [30, 40] and inside.max(axis=0).tolist() == [34, 44]
    window = crop_around(frames, np.array([32, 42]), 16)
    assert window.shape == (2, 16, 16, 3) and np.shares_memory(window, frames)  # a view
    assert window[..., 0].sum() == frames[..., 0].sum()  # shifted inside the plane, brain kept
    corner = crop_around(frames, np.array([0, 0]), 16)
    assert corner.shape == (2, 16, 16, 3)
    assert brain_pixels(np.zeros((1, 4, 4, 2))).shape == (16, 2)  # no brain: anywhere


def test_phantom_stream_crops_training_items_but_validation_sees_whole_volumes():
    cfg = parse_config(
        {
            "network": TINY_NETWORK,
            "data": {"kind": "phantom", "max_tr": 4, "phantom": {**PHANTOM, "crop": 16}},
        }
    ).data
    studies = PhantomStudies(cfg.phantom)
    items = list(itertools.islice(StudyStream(cfg, studies, seed=0), 3))
    assert all(item.x.shape == (3, 8, 16, 16) for item in items)
    assert all((item.x > -1).any() for item in items)  # centred on brain, not on air
    assert drawn_validation(cfg, studies)[(0, False)].x.shape == (3, 8, 32, 32)


def test_crop_larger_than_the_matrix_is_a_config_error():
    from training.config import TrainingConfigError

    with pytest.raises(TrainingConfigError, match="crop 64 is larger than the matrix 32"):
        parse_config({"data": {"kind": "phantom", "phantom": {**PHANTOM, "crop": 64}}})


class BolusStudies:
    """A study source without the phantom: Gaussian boluses of the configured shape."""

    def __init__(self, shape=(8, 32, 32), frames=10):
        self.shape, self.frames, self.calls = shape, frames, 0

    def __call__(self, rng):
        self.calls += 1
        return bolus_sequence(self.frames, peak=4, shape=self.shape, seed=int(rng.integers(1000)))


def test_any_study_source_feeds_the_stream_and_its_draws_are_reproducible():
    cfg = phantom_config("x").data
    first = list(itertools.islice(StudyStream(cfg, BolusStudies(), seed=3), 4))
    again = list(itertools.islice(StudyStream(cfg, BolusStudies(), seed=3), 4))
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, again))
    source = BolusStudies()
    list(itertools.islice(StudyStream(cfg, source, seed=3), 2 * PHANTOM["samples_per_study"]))
    assert source.calls == 2  # samples_per_study tuples from each study before the next


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (BolusStudies(shape=(8, 16, 16)), r"shape \(8, 16, 16, 10\) is not the published layout \(8, 32, 32, T\)"),
        (lambda rng: np.full((8, 32, 32, 10), 200.0, np.float32), "values span 200..200, expected windowed HU 0..80"),
        (lambda rng: np.zeros((8, 32, 32, 2), np.float32), "2 time points, need at least 3"),
    ],
)
def test_a_source_drawing_the_wrong_studies_is_a_data_error_naming_the_draw(source, message):
    cfg = phantom_config("x").data
    with pytest.raises(DataError, match=message) as caught:
        next(iter(StudyStream(cfg, source)))
    assert "<drawn study training>" in str(caught.value)


def test_phantom_data_without_a_study_source_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `ctp-node train`, which supplies the digital phantom"):
        train(phantom_config(tmp_path / "run"))
