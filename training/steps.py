"""One optimisation step of the published recipe, and the two ways a run looks at its network.

- :func:`training_loss`: the target channel of ``x = [left, target, right]`` is noised at a level
  drawn by `model.loss.sample_noise_levels` (one bin per batch, ``g`` per sample) and the network
  predicts the noise from ``[left, noisy target, right]`` and the contexts (`model.loss.diffusion_loss`).
- :func:`optimisation_step`: that loss, Adam, the MultiStep learning-rate step, the published EMA.
- :func:`validation_loss` (fixed batches, fixed noise) and :func:`preview` (a sampled target).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model.device import autocast
from model.loss import LossType, diffusion_loss, eps_from_output, sample_noise_levels
from model.samplers import sample_dpmpp_2m
from model.schedule import NoiseSchedule
from model.unet import network_input
from training.config import OptimConfig
from training.datasets import TrainingItem
from training.state import TrainState, update_ema


def to_device(batch: TrainingItem, device: torch.device) -> TrainingItem:
    return TrainingItem(*(t.to(device, non_blocking=True) for t in batch))


def training_loss(
    net: nn.Module,
    batch: TrainingItem,
    schedule: NoiseSchedule,
    loss_type: LossType = "l1",
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The published objective on one batch: the target channel is noised, left and right condition."""
    x = batch.x
    left, x0, right = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    levels = sample_noise_levels(schedule, x.shape[0], generator).to(x.device)

    def eps_model(x_noisy: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return net(network_input(left, x_noisy, right), batch.local_context, batch.global_context, level)

    prediction = _prediction(net)
    return diffusion_loss(eps_model, x0, levels, loss_type, noise=noise, prediction=prediction)


def _prediction(net: nn.Module) -> str:
    """What the network predicts (``eps`` or ``x0``), through a DistributedDataParallel wrapper."""
    inner = getattr(net, "module", net)
    return inner.config.prediction


def optimisation_step(
    state: TrainState,
    net: nn.Module,
    batch: TrainingItem,
    schedule: NoiseSchedule,
    *,
    loss_type: LossType,
    optim: OptimConfig,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One step; ``net`` is ``state.model`` or its DDP wrapper. Returns the (detached) loss."""
    state.optimizer.zero_grad(set_to_none=True)
    with autocast(batch.x.device, amp_dtype):
        loss = training_loss(net, batch, schedule, loss_type)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    update_ema(state.ema, state.model, state.step, optim)
    state.step += 1
    return loss.detach()


@torch.no_grad()
def validation_loss(
    net: nn.Module,
    batches: Iterable[TrainingItem],
    schedule: NoiseSchedule,
    loss_type: LossType,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> float:
    """Mean loss over the given batches with noise levels and noise drawn from ``seed`` (comparable
    from one evaluation to the next)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        noise = torch.randn(batch.x[:, 1:2].shape, generator=generator).to(device)
        with autocast(device, amp_dtype):
            loss = training_loss(net, to_device(batch, device), schedule, loss_type, generator=generator, noise=noise)
        total, count = total + float(loss), count + 1
    return total / max(count, 1)


@torch.no_grad()
def preview(
    net: nn.Module,
    item: TrainingItem,
    schedule: NoiseSchedule,
    steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Mid slices of left | target | right | sampled target (DPM-Solver++(2M), ``steps`` steps) of the
    first item, side by side: (1, H, 4W) in [0, 1]."""
    batch = to_device(TrainingItem(*(t[:1] for t in item)), device)
    left, right = batch.x[:, 0:1], batch.x[:, 2:3]

    def eps_fn(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            out = net(network_input(left, x, right), batch.local_context, batch.global_context, level).float()
        return eps_from_output(out, x, level, _prediction(net))

    start = torch.randn(left.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    predicted = sample_dpmpp_2m(eps_fn, start, schedule, steps)
    mid = left.shape[2] // 2
    panels = [batch.x[0, c, mid] for c in range(3)] + [predicted[0, 0, mid]]
    return ((torch.cat(panels, dim=-1) + 1) / 2).unsqueeze(0).float().cpu()
