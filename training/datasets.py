"""Training items from 1 s CTP sequences: the published ``.npy`` layout and studies drawn on the fly.

A sequence is held in the published layout, (depth, H, W, T) windowed HU 0..80, skull-stripped, and
turned into items only when one is drawn: ``x`` (3, D, H, W) = [left, target, right] in model space,
``local_context`` (2,) and ``global_context`` (3,) one-hot, with the published random horizontal
flip (W axis).

- :class:`TupleDataset` (map-style): every published tuple of a list of sequences. Its key is
  ``(index, flip)``, so the sampler (training/loader.py) owns every random choice and a resumed run
  sees exactly the stream an uninterrupted one would.
- :class:`StudyStream` (iterable): endless studies drawn from a :class:`StudySource` (``ctp-node
  train`` passes the digital phantom, ctp_node/phantom/training_source.py); ``samples_per_study``
  tuples from each before the next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from model.window import WINDOW_HIGH_HU, WINDOW_LOW_HU, to_model_space
from training.config import DataConfig
from training.samples import TrainingSample, enumerate_samples, sample_weights, training_peak

MIN_FRAMES = 3  # the shortest sequence with one tuple (gap 2)
RANGE_TOLERANCE_HU = 1e-3


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and what is wrong."""


class TrainingItem(NamedTuple):
    """One training example (or, collated, a batch with a leading batch axis)."""

    x: torch.Tensor  # (3, D, H, W) [left, target, right] in model space
    local_context: torch.Tensor  # (2,)
    global_context: torch.Tensor  # (3,) one-hot scenario


@dataclass(frozen=True)
class CTPSequence:
    """A 1 s sequence in the published layout and its training tuples."""

    name: str
    frames: np.ndarray  # (D, H, W, T) windowed HU 0..80; may be a read-only memory map
    samples: tuple[TrainingSample, ...]
    # What the network is asked to produce for a target second, where known and different from the
    # measured frames: the same study without noise (a simulated study knows it). The loss then
    # pulls towards the posterior mean instead of towards one noise draw. None: the measured frames.
    targets: np.ndarray | None = None

    @classmethod
    def from_frames(
        cls,
        name: str,
        frames: np.ndarray,
        max_tr: int,
        sums: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ) -> CTPSequence:
        """The sequence with its tuples; ``sums`` (per-volume voxel sums) when already computed."""
        sums = frame_sums(frames) if sums is None else sums
        if targets is not None and targets.shape != frames.shape:
            raise DataError(f"{name}: noise-free targets {targets.shape} differ from the frames {frames.shape}")
        return cls(name, frames, enumerate_samples(frames.shape[-1], training_peak(sums), max_tr), targets)


def frame_sums(frames: np.ndarray) -> np.ndarray:
    """Sum of all voxel values of each volume (float64, (T,)), read one slab at a time."""
    return np.sum([np.asarray(frames[d], dtype=np.float64).sum(axis=(0, 1)) for d in range(frames.shape[0])], axis=0)


def make_item(
    frames: np.ndarray, sample: TrainingSample, flip: bool, targets: np.ndarray | None = None
) -> TrainingItem:
    """The network's input for one tuple: [left, target, right] volumes in model space; the target
    volume from ``targets`` (the noise-free study) when given, the conditions always as measured."""
    target = (frames if targets is None else targets)[..., sample.target]
    volumes = np.stack([frames[..., sample.left], target, frames[..., sample.right]])
    x = to_model_space(volumes)
    if flip:
        x = x[..., ::-1]
    return TrainingItem(
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.tensor(sample.local_context, dtype=torch.float32),
        torch.tensor(sample.global_context, dtype=torch.float32),
    )


def check_frames(path: Path, frames: np.ndarray, volume_shape: tuple[int, int, int]) -> np.ndarray:
    """Shape (depth, H, W, T >= 3) with the configured volume shape, finite values within 0..80 HU.

    Reads the array once, one slab at a time, and returns its per-volume voxel sums (T,).
    """
    expected = f"({', '.join(map(str, volume_shape))}, T) with T >= {MIN_FRAMES}"
    if frames.ndim != 4 or tuple(frames.shape[:3]) != tuple(volume_shape):
        raise DataError(
            f"{path}: shape {tuple(frames.shape)} is not the published layout {expected} "
            "(depth, H, W, time at 1 s); transpose or resample the sequence"
        )
    if frames.shape[3] < MIN_FRAMES:
        raise DataError(f"{path}: {frames.shape[3]} time points, need at least {MIN_FRAMES} for one training tuple")
    if not np.issubdtype(frames.dtype, np.number) or np.issubdtype(frames.dtype, np.complexfloating):
        raise DataError(f"{path}: dtype {frames.dtype} is not a real number type")
    low, high = math.inf, -math.inf
    sums = np.zeros(frames.shape[3], dtype=np.float64)
    for d in range(frames.shape[0]):
        slab = np.asarray(frames[d], dtype=np.float64)
        if not np.isfinite(slab).all():
            raise DataError(f"{path}: contains NaN or infinite values (slab {d})")
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        sums += slab.sum(axis=(0, 1))
    if low < WINDOW_LOW_HU - RANGE_TOLERANCE_HU or high > WINDOW_HIGH_HU + RANGE_TOLERANCE_HU:
        raise DataError(
            f"{path}: values span {low:g}..{high:g}, expected windowed HU {WINDOW_LOW_HU:g}..{WINDOW_HIGH_HU:g} "
            "(level 40 / width 80, skull-stripped); window the data first"
        )
    return sums


def load_npy_sequence(path: Path, volume_shape: tuple[int, int, int], max_tr: int) -> CTPSequence:
    """A memory-mapped, validated ``.npy`` sequence (depth, H, W, T) at 1 s."""
    try:
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
    sums = check_frames(path, frames, volume_shape)
    return CTPSequence.from_frames(path.name, frames, max_tr, sums)


def npy_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise DataError(f"{folder} holds no .npy sequences")
    return files


def npy_split(config: DataConfig) -> tuple[list[Path], list[Path]]:
    """Training and validation files of the published layout ``root/train``, ``root/val``."""
    root = config.root
    if root is None or not root.is_dir():
        raise DataError(f"data folder {root} does not exist; set data.root to the folder holding train/ and val/")
    if not (root / "train").is_dir():
        raise DataError(f"data folder {root} has no train/ subfolder (the published layout is train/ and val/)")
    train = npy_files(root / "train")
    if (root / "val").is_dir():
        return train, npy_files(root / "val")
    held_out = math.ceil(config.val_fraction * len(train)) if config.val_fraction > 0 else 0
    if held_out >= len(train):
        raise DataError(f"val_fraction {config.val_fraction} leaves no training file out of {len(train)}")
    return train[: len(train) - held_out], train[len(train) - held_out :]


class TupleDataset(Dataset[TrainingItem]):
    """Every published tuple of a list of sequences; ``dataset[(index, flip)]`` is one item."""

    def __init__(self, sequences: Sequence[CTPSequence]) -> None:
        self.sequences = list(sequences)
        self._where = [(s, j) for s, seq in enumerate(self.sequences) for j in range(len(seq.samples))]

    def __len__(self) -> int:
        return len(self._where)

    def sample(self, index: int) -> tuple[CTPSequence, TrainingSample]:
        s, j = self._where[index]
        return self.sequences[s], self.sequences[s].samples[j]

    def __getitem__(self, key: int | tuple[int, bool]) -> TrainingItem:
        index, flip = (key, False) if isinstance(key, int) else key
        sequence, sample = self.sample(int(index))
        return make_item(sequence.frames, sample, bool(flip), sequence.targets)

    def weights(self, gap_weights: dict[int, float] | None = None) -> np.ndarray:
        """Per-item sampling weights (see training.samples)."""
        return sample_weights((self.sequences[s].samples[j] for s, j in self._where), gap_weights)


def npy_datasets(config: DataConfig) -> tuple[TupleDataset, TupleDataset | None]:
    """Training and validation tuple datasets of the published ``.npy`` layout."""
    train_files, val_files = npy_split(config)

    def load(files: list[Path]) -> list[CTPSequence]:
        return [load_npy_sequence(f, config.volume_shape, config.max_tr) for f in files]

    return TupleDataset(load(train_files)), (TupleDataset(load(val_files)) if val_files else None)


# --- studies drawn on the fly ----------------------------------------------------------------------


class DrawnStudy(NamedTuple):
    """A drawn study as measured (``frames``) and, where the source knows it, without noise."""

    frames: np.ndarray
    noise_free: np.ndarray | None = None


class StudySource(Protocol):
    """Where drawn studies come from (``data.kind = "phantom"``); must be picklable for DataLoader workers.

    ``source(rng)`` draws one random study as a published-layout sequence (depth, H, W, T) at 1 s,
    windowed 0..80 HU and 0 outside the brain, of the configured ``(slices, matrix, matrix)``;
    everything random comes from ``rng``, so the draw is reproducible. A source that knows the study
    without noise returns a :class:`DrawnStudy` with it; the trainer then uses it as the target.
    """

    def __call__(self, rng: np.random.Generator) -> np.ndarray | DrawnStudy: ...


def draw_sequence(studies: StudySource, config: DataConfig, rng: np.random.Generator, name: str) -> CTPSequence:
    """One drawn study as a sequence, checked like a published file (a wrong source is a DataError)."""
    drawn = studies(rng)
    frames, noise_free = (drawn.frames, drawn.noise_free) if isinstance(drawn, DrawnStudy) else (drawn, None)
    sums = check_frames(Path(f"<drawn study {name}>"), frames, config.shape)
    if noise_free is not None:
        check_frames(Path(f"<drawn study {name}, noise-free>"), noise_free, config.shape)
    return CTPSequence.from_frames(name, frames, config.max_tr, sums, noise_free)


class StudyStream(IterableDataset[TrainingItem]):
    """Endless training items from freshly drawn studies.

    Each (rank, DataLoader worker) draws its own studies from ``(seed, rank, worker, start)``; a
    resumed run passes its step as ``start`` so it draws new studies rather than replaying old ones.
    Tuples are drawn per study with the gap weights; flips with probability 1/2.
    """

    def __init__(
        self,
        config: DataConfig,
        studies: StudySource,
        *,
        seed: int = 0,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        self.config, self.studies = config, studies
        self.seed, self.rank, self.start = seed, rank, start

    def __iter__(self) -> Iterator[TrainingItem]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start])
        phantom = self.config.phantom
        while True:
            sequence = draw_sequence(self.studies, self.config, rng, "training")
            weights = sample_weights(sequence.samples, self.config.gap_weights)
            if weights.sum() <= 0:
                continue
            picks = rng.choice(len(sequence.samples), size=phantom.samples_per_study, p=weights / weights.sum())
            brain = brain_pixels(sequence.frames) if phantom.crop is not None else None
            for index in picks:
                frames, targets = sequence.frames, sequence.targets
                if brain is not None and phantom.crop is not None:
                    centre = brain[int(rng.integers(len(brain)))]
                    frames = crop_around(frames, centre, phantom.crop)
                    targets = None if targets is None else crop_around(targets, centre, phantom.crop)
                yield make_item(frames, sequence.samples[int(index)], bool(rng.random() < 0.5), targets)


def brain_pixels(frames: np.ndarray) -> np.ndarray:
    """(N, 2) in-plane (row, column) of every pixel inside the brain on any slice (skull-stripped
    sequences are exactly 0 outside); the whole plane when nothing is inside."""
    inside = np.argwhere((frames[..., 0] > 0).any(axis=0))
    if len(inside) == 0:
        inside = np.argwhere(np.ones(frames.shape[1:3], dtype=bool))
    return inside


def crop_around(frames: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` in-plane window of (D, H, W, T) frames centred on ``centre``, shifted
    to lie inside the plane (a view, not a copy)."""
    height, width = frames.shape[1:3]
    top = int(np.clip(centre[0] - size // 2, 0, height - size))
    left = int(np.clip(centre[1] - size // 2, 0, width - size))
    return frames[:, top : top + size, left : left + size]


def drawn_validation(config: DataConfig, studies: StudySource, seed: int = 0) -> TupleDataset | None:
    """A fixed set of ``val_studies`` drawn studies (seeds apart from training's)."""
    count = config.phantom.val_studies
    if count == 0:
        return None
    rng = np.random.default_rng([seed, 2**20])
    return TupleDataset([draw_sequence(studies, config, rng, f"val-{i}") for i in range(count)])
