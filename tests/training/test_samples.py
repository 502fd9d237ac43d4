from collections import Counter

import numpy as np
import pytest

from model.window import to_model_space
from training.datasets import CTPSequence, TupleDataset, load_npy_sequence
from training.loader import TupleSampler
from training.samples import (
    TrainingSample,
    enumerate_samples,
    gap_shares,
    sample_weights,
    training_peak,
    validate_gap_weights,
)

RISING, PEAK, FALLING = 0, 1, 2

# T = 6 seconds, max_tr = 4 (local context divides by 2), peak at second 3; written out by hand.
EXPECTED_T6_MAXTR4_PEAK3 = [
    # left, target, right, local context, scenario
    (0, 1, 2, (0.0, 0.0), RISING),
    (0, 1, 3, (0.0, 0.5), RISING),
    (0, 2, 3, (0.5, 0.0), RISING),
    (0, 1, 4, (0.0, 1.0), PEAK),
    (0, 2, 4, (0.5, 0.5), PEAK),
    (0, 3, 4, (1.0, 0.0), PEAK),
    (1, 2, 3, (0.0, 0.0), RISING),
    (1, 2, 4, (0.0, 0.5), PEAK),
    (1, 3, 4, (0.5, 0.0), PEAK),
    (1, 2, 5, (0.0, 1.0), PEAK),
    (1, 3, 5, (0.5, 0.5), PEAK),
    (1, 4, 5, (1.0, 0.0), PEAK),
    (2, 3, 4, (0.0, 0.0), PEAK),
    (2, 3, 5, (0.0, 0.5), PEAK),
    (2, 4, 5, (0.5, 0.0), PEAK),
    (3, 4, 5, (0.0, 0.0), FALLING),
]


def as_tuples(samples):
    return [(s.left, s.target, s.right, s.local_context, s.scenario) for s in samples]


def test_enumerator_yields_exactly_the_published_tuples():
    peak = training_peak([1.0, 2.0, 5.0, 9.0, 4.0, 3.0])
    assert peak == 3
    assert as_tuples(enumerate_samples(6, peak, max_tr=4)) == EXPECTED_T6_MAXTR4_PEAK3


def test_published_max_tr_counts_and_context_range():
    samples = enumerate_samples(61, peak=20)  # a 61 s study, max_tr = 8
    by_gap = Counter(s.gap for s in samples)
    assert by_gap == {g: (61 - g) * (g - 1) for g in range(2, 9)}
    contexts = np.array([s.local_context for s in samples])
    assert contexts.min() == 0.0 and contexts.max() == 1.0
    assert TrainingSample(0, 4, 8, (0.5, 0.5), RISING) in samples
    assert TrainingSample(0, 4, 8, (0.5, 0.5), RISING).global_context == (1.0, 0.0, 0.0)


def test_peak_ties_take_the_first_second_and_bad_input_is_refused():
    assert training_peak([1, 7, 7, 2]) == 1
    with pytest.raises(ValueError, match="outside"):
        enumerate_samples(5, peak=5)
    with pytest.raises(ValueError, match="max_tr"):
        enumerate_samples(5, peak=1, max_tr=2)


def test_gap_weights_change_shares_as_documented():
    samples = enumerate_samples(6, 3, max_tr=4)  # 4 tuples of gap 2, 6 of gap 3, 6 of gap 4
    assert gap_shares(samples) == pytest.approx({2: 4 / 16, 3: 6 / 16, 4: 6 / 16})
    weights = {2: 3.0, 4: 0.0}  # per-tuple multipliers; gap 3 keeps 1.0
    assert sample_weights(samples, weights).tolist() == [
        3.0 if s.gap == 2 else 0.0 if s.gap == 4 else 1.0 for s in samples
    ]
    assert gap_shares(samples, weights) == pytest.approx({2: 12 / 18, 3: 6 / 18, 4: 0.0})


def test_weighted_sampler_draws_gaps_with_those_frequencies():
    samples = enumerate_samples(6, 3, max_tr=4)
    sampler = TupleSampler(sample_weights(samples, {2: 3.0, 4: 0.0}), seed=1)
    drawn = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        drawn += [samples[i].gap for i, _ in sampler]
    freq = Counter(drawn)
    assert freq[4] == 0
    assert freq[2] / len(drawn) == pytest.approx(2 / 3, abs=0.02)
    assert freq[3] / len(drawn) == pytest.approx(1 / 3, abs=0.02)


def test_uniform_sampler_is_a_permutation_sharded_over_ranks():
    ranks = [TupleSampler(np.ones(16), num_replicas=2, rank=r, seed=5) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    first, second = ([i for i, _ in s] for s in ranks)
    assert len(first) == len(second) == 8
    assert sorted(first + second) == list(range(16))
    ranks[0].set_epoch(3, start=5)  # resuming skips what was already handed out
    assert [i for i, _ in ranks[0]] == first[5:]


def test_gap_weight_validation():
    with pytest.raises(ValueError, match="outside the trained range"):
        validate_gap_weights({9: 1.0}, max_tr=8)
    with pytest.raises(ValueError, match="finite and >= 0"):
        validate_gap_weights({3: -1.0})
    with pytest.raises(ValueError, match="excludes every gap"):
        validate_gap_weights({2: 0, 3: 0, 4: 0}, max_tr=4)


def test_dataset_items_hold_left_target_right_in_model_space_with_scenario_from_the_data(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 40, (2, 4, 6, 6)).astype(np.float32)
    frames[..., 3] += 30  # the brightest volume: peak at second 3
    dataset = TupleDataset([CTPSequence.from_frames("seq", frames, max_tr=4)])
    assert as_tuples(dataset.sequences[0].samples) == EXPECTED_T6_MAXTR4_PEAK3
    index = 3  # (0, 1, 4), around the peak
    item = dataset[(index, False)]
    np.testing.assert_array_equal(
        item.x.numpy(), to_model_space(np.stack([frames[..., 0], frames[..., 1], frames[..., 4]]))
    )
    assert item.local_context.tolist() == [0.0, 1.0]
    assert item.global_context.tolist() == [0.0, 1.0, 0.0]
    flipped = dataset[(index, True)]
    np.testing.assert_array_equal(flipped.x.numpy(), item.x.numpy()[..., ::-1])  # horizontal flip: W axis
    np.save(tmp_path / "seq.npy", frames)  # the .npy path finds the same peak while validating the file
    assert load_npy_sequence(tmp_path / "seq.npy", (2, 4, 6), max_tr=4).samples == dataset.sequences[0].samples


def test_training_and_inference_share_the_one_hot_scenario():
    from model.planner import Target, scenario_one_hot

    samples = enumerate_samples(12, peak=5, max_tr=4)
    for sample in samples:
        inference = Target(sample.target, sample.left, sample.right, sample.local_context, sample.scenario)
        assert sample.global_context == inference.global_context == scenario_one_hot(sample.scenario)
    assert {s.global_context for s in samples} == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
    with pytest.raises(ValueError, match="contrast scenario must be 0, 1 or 2"):
        scenario_one_hot(3)
