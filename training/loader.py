"""Endless, resumable batches for the trainer, sharded over DDP ranks.

:class:`TupleSampler` is DistributedSampler's contract (a per-epoch permutation from ``seed +
epoch``, padded to a multiple of the world size, every rank its own slice) plus two additions: gap
weights (a weighted draw with replacement instead of the permutation) and the flip decision of each
item. So the sampler alone decides the data stream, whatever the number of DataLoader workers, and
:class:`BatchStream` resumes it exactly from (epoch, position).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.config import DataConfig
from training.datasets import (
    DataError,
    StudySource,
    StudyStream,
    TrainingItem,
    TupleDataset,
    drawn_validation,
    npy_datasets,
)


class TupleSampler(Sampler[tuple[int, bool]]):
    """Yields ``(index, flip)`` for one rank; weighted with replacement when the weights differ."""

    def __init__(
        self,
        weights: np.ndarray,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        flip: bool = True,
    ) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or weights.size == 0 or weights.sum() <= 0:
            raise ValueError("the sampler needs a non-empty weight per item with a positive total")
        self.probabilities = weights / weights.sum()
        self.uniform = bool(np.all(weights == weights[0]))
        self.num_replicas, self.rank, self.seed, self.flip = num_replicas, rank, seed, flip
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(weights.size / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's draw; skip its first ``start`` items of this rank (resuming)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.probabilities.size
        order = rng.permutation(n) if self.uniform else rng.choice(n, size=n, replace=True, p=self.probabilities)
        flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, dtype=bool)
        total = self.per_rank * self.num_replicas
        order, flips = np.resize(order, total), np.resize(flips, total)  # wrap around, as DistributedSampler pads
        mine = slice(self.rank, total, self.num_replicas)
        for index, flip in list(zip(order[mine].tolist(), flips[mine].tolist()))[self.start :]:
            yield int(index), bool(flip)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM to the main process, which stops cleanly after its
    step; a worker killed by the terminal's SIGINT would otherwise break the batch fetch in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchStream:
    """Batches epoch after epoch; ``state_dict()`` says how many were handed out, for resuming."""

    def __init__(
        self,
        dataset: Dataset[TrainingItem],
        batch_size: int,
        *,
        sampler: TupleSampler | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        if sampler is not None and len(sampler) < batch_size:
            raise DataError(
                f"one epoch holds {len(sampler)} training tuples per process, fewer than the batch of {batch_size}; "
                "add sequences or lower optim.batch_size"
            )
        self.sampler = sampler
        self.epoch = 0
        self.position = 0
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=num_workers > 0 and sampler is not None,
            worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
            # Worker seeds come from this generator, not the global RNG the trainer's noise uses.
            generator=torch.Generator().manual_seed(seed),
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[TrainingItem]:
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch, start=self.position * self.loader.batch_size)  # type: ignore[operator]
            for batch in self.loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


@dataclass
class TrainData:
    """What the trainer reads: the training stream and an optional validation dataset."""

    stream: BatchStream
    validation: TupleDataset | None


def build_data(
    config: DataConfig,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    start_step: int = 0,
    studies: StudySource | None = None,
) -> TrainData:
    """The training stream of this rank (``batch_size`` per process) and the validation set.

    ``studies``: where ``data.kind = "phantom"`` draws its studies (required for that kind).
    """
    if config.kind == "npy":
        train, validation = npy_datasets(config)
        sampler = TupleSampler(train.weights(config.gap_weights), num_replicas=world_size, rank=rank, seed=seed)
        stream = BatchStream(
            train, batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, seed=seed
        )
        return TrainData(stream, validation)
    if studies is None:
        raise DataError(
            'data.kind = "phantom" draws its studies from a study source: run `ctp-node train`, which supplies '
            "the digital phantom, or pass studies= to training.trainer.train"
        )
    drawn = StudyStream(config, studies, seed=seed, rank=rank, start=start_step)
    stream = BatchStream(drawn, batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed)
    return TrainData(stream, drawn_validation(config, studies, seed) if rank == 0 else None)


def fixed_batches(dataset: TupleDataset, batch_size: int, count: int, seed: int = 0) -> Iterator[TrainingItem]:
    """The same ``count`` batches every call (validation): a seeded, unflipped draw."""
    sampler = TupleSampler(np.ones(len(dataset)), seed=seed, flip=False)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), sampler=sampler)
    for i, batch in enumerate(loader):
        if i >= count:
            break
        yield batch
