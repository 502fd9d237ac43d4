"""The training loop: the published recipe (training/steps.py) run for ``optim.iterations`` steps.

bf16 autocast on CUDA, optional gradient checkpointing, DistributedDataParallel under ``torchrun``
(never DataParallel; only rank 0 writes). Every ``checkpoint_every`` steps, and at the end, a
resumable checkpoint ``<output>/checkpoints/last.pt``; at the end also the inference-only
``<output>/model_ema_bf16.pt``. Ctrl-C or SIGTERM: the step in flight finishes, a checkpoint is
written, and :func:`train` returns with ``stopped=True``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.device import autocast_dtype
from model.schedule import NoiseSchedule
from training.config import TrainConfig
from training.datasets import StudySource, TrainingItem, TupleDataset
from training.distributed import DistContext, any_rank, distributed_context, gather_to_main, mean_over_ranks
from training.loader import BatchStream, build_data, fixed_batches
from training.monitor import Monitor, RunMonitor, SilentMonitor
from training.state import (
    TrainState,
    export_inference,
    finetune_state,
    new_state,
    resume_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from training.steps import optimisation_step, preview, to_device, validation_loss

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
EXPORT_NAME = "model_ema_bf16.pt"
StepCallback = Callable[[TrainState], None]


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, misconfigured for this launch); the message says what to do."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    checkpoint: Path | None  # the resumable checkpoint written last (rank 0 only)
    stopped: bool  # True when a stop was requested before the last iteration
    last_loss: float | None
    export: Path | None = None  # the inference-only EMA checkpoint, written when training completes


class StopRequest:
    """Set by SIGINT/SIGTERM while installed, or by :meth:`request`; the loop stops after its step."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str = "stop requested") -> None:
        self.requested, self.reason = True, reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.request(f"{signal.Signals(signum).name} received")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Route SIGINT and SIGTERM here for the duration (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def train(
    config: TrainConfig,
    stop: StopRequest | None = None,
    callback: StepCallback | None = None,
    *,
    studies: StudySource | None = None,
) -> TrainResult:
    """Run, fine-tune or resume training as configured; under ``torchrun`` one process per device.

    ``stop``: request a clean stop from elsewhere (signals are routed to it while training).
    ``callback(state)``: called on every rank after each optimiser step (custom logging, tests).
    ``studies``: where ``data.kind = "phantom"`` draws its studies (``ctp-node train`` passes the
    digital phantom).
    """
    stop = stop or StopRequest()
    runtime, optim = config.runtime, config.optim
    with distributed_context(runtime.device) as ctx:
        if optim.batch_size % ctx.world_size:
            raise TrainingError(
                f"optim.batch_size {optim.batch_size} (the global batch) does not split evenly over "
                f"{ctx.world_size} processes"
            )
        monitor: Monitor = SilentMonitor()
        if ctx.is_main:
            runtime.output.mkdir(parents=True, exist_ok=True)
            (runtime.output / "config.json").write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
            monitor = RunMonitor(runtime.output / "tensorboard", total=optim.iterations, progress=runtime.progress)
        try:
            with stop.installed():
                return _run(config, ctx, stop, monitor, callback, studies)
        finally:
            monitor.close()


def _prepare(config: TrainConfig, ctx: DistContext, monitor: Monitor) -> tuple[TrainState, dict[str, Any] | None]:
    """The state to start from: fresh, fine-tuned or resumed (then also the stored training section)."""
    torch.manual_seed(config.runtime.seed + ctx.rank)
    state = new_state(config, ctx.device)
    init = config.init
    if init.resume is not None:
        training = resume_state(init.resume, state, config)
        states = training.get("rng") or []
        if len(states) == ctx.world_size:
            set_rng_state(states[ctx.rank], ctx.device)
        else:
            torch.manual_seed(config.runtime.seed + 1000 * state.step + ctx.rank)
            monitor.message(
                f"the checkpoint holds RNG states of {len(states)} processes, not {ctx.world_size}: reseeded"
            )
        monitor.message(f"resuming {init.resume} at step {state.step}")
        return state, training
    if init.weights is not None:
        for note in finetune_state(init.weights, state):
            monitor.message(note)
    return state, None


def _run(
    config: TrainConfig,
    ctx: DistContext,
    stop: StopRequest,
    monitor: Monitor,
    callback: StepCallback | None,
    studies: StudySource | None,
) -> TrainResult:
    runtime, optim = config.runtime, config.optim
    state, training = _prepare(config, ctx, monitor)
    data = build_data(
        config.data,
        optim.batch_size // ctx.world_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=runtime.seed,
        num_workers=runtime.num_workers,
        pin_memory=ctx.device.type == "cuda",
        start_step=state.step,
        studies=studies,
    )
    if training is not None:
        data.stream.load_state_dict(training["data"])
    schedule = config.diffusion.noise_schedule()
    amp_dtype = autocast_dtype(ctx.device, runtime.precision)
    net: nn.Module = state.model
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    if ctx.distributed:
        net = DistributedDataParallel(state.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    checkpoint: Path | None = None
    last_loss: float | None = None
    running, count = torch.zeros((), device=ctx.device), 0
    batches = iter(data.stream)
    monitor.start(state.step)
    while state.step < optim.iterations:
        batch = to_device(next(batches), ctx.device)
        running += optimisation_step(
            state, net, batch, schedule, loss_type=config.diffusion.loss, optim=optim, amp_dtype=amp_dtype
        )
        count += 1
        step, final = state.step, state.step == optim.iterations
        logged = step % runtime.log_every == 0 or final
        if logged:
            last_loss = mean_over_ranks(running / count, ctx)
            running, count = torch.zeros((), device=ctx.device), 0
            if not math.isfinite(last_loss):
                raise TrainingError(
                    f"the loss is {last_loss} at step {step}: training diverged; resume from the last checkpoint "
                    "with a lower optim.lr"
                )
            monitor.scalars(step, {"train/loss": last_loss, "train/lr": state.scheduler.get_last_lr()[0]})
        monitor.step(step, last_loss if logged else None)
        if callback is not None:
            callback(state)
        if ctx.is_main:
            _evaluate(state, batch, data.validation, schedule, config, ctx.device, amp_dtype, monitor)
        stopping = any_rank(stop.requested, ctx)
        if step % runtime.checkpoint_every == 0 or stopping or final:
            checkpoint = _write_checkpoint(ctx, state, config, data.stream)
        if stopping:
            monitor.message(f"{stop.reason or 'stop requested'}: stopped after step {step} ({checkpoint})")
            return TrainResult(step, checkpoint, True, last_loss)
    export = export_inference(checkpoint, runtime.output / EXPORT_NAME) if checkpoint is not None else None
    return TrainResult(state.step, checkpoint, False, last_loss, export)


def _write_checkpoint(ctx: DistContext, state: TrainState, config: TrainConfig, stream: BatchStream) -> Path | None:
    """Gather every rank's RNG state; rank 0 writes ``checkpoints/last.pt`` (and a kept copy)."""
    rng_states = gather_to_main(rng_state(ctx.device), ctx)
    if not ctx.is_main or rng_states is None:
        return None
    path = save_training_checkpoint(
        config.runtime.output / LAST_CHECKPOINT, state, config, data_state=stream.state_dict(), rng_states=rng_states
    )
    keep = config.runtime.keep_every
    if keep and state.step % keep == 0:
        shutil.copyfile(path, path.with_name(f"step_{state.step:07d}.pt"))
    return path


def _evaluate(
    state: TrainState,
    batch: TrainingItem,
    validation: TupleDataset | None,
    schedule: NoiseSchedule,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    monitor: Monitor,
) -> None:
    """Validation loss of the EMA network and a preview image, at their intervals (rank 0)."""
    runtime, step = config.runtime, state.step
    if runtime.val_every and step % runtime.val_every == 0 and validation is not None:
        batches = fixed_batches(validation, config.optim.batch_size, runtime.val_batches, runtime.seed)
        loss = validation_loss(state.ema, batches, schedule, config.diffusion.loss, device, amp_dtype, runtime.seed)
        monitor.scalars(step, {"val/loss_ema": loss})
    if runtime.sample_every and step % runtime.sample_every == 0:
        item = next(fixed_batches(validation, 1, 1, runtime.seed)) if validation is not None else batch
        image = preview(state.ema, item, schedule, runtime.sample_steps, device, amp_dtype, runtime.seed)
        monitor.image(step, "samples/left_target_right_prediction", image)
