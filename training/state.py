"""Everything a training run owns and a checkpoint restores: model, EMA, optimiser, scheduler, step.

Checkpoints use the project's format through `model.checkpoint.save_checkpoint` (atomic write): the
unwrapped model and EMA weights (never a DDP-wrapped state dict), the schedule, the step, plus
``config`` (the full training configuration) and ``training`` (optimiser and scheduler state, data
stream position, every rank's RNG state). `model.load_denoiser` reads them like any checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import CheckpointError, build_denoiser, read_checkpoint, save_checkpoint
from model.unet import UNet3D
from training.config import OptimConfig, TrainConfig, parse_config


@dataclass
class TrainState:
    """The mutable state of a run; ``step`` counts completed optimiser steps."""

    model: UNet3D
    ema: UNet3D
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    step: int = 0


def orthogonal_init_(net: nn.Module) -> nn.Module:
    """The published init: orthogonal weights (gain 1) and zero biases for every conv and linear layer.

    It overrides the zero init of the residual blocks' and the output's last convolutions, as in the
    published trainer; norms and the scenario embedding matrix keep their init.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.orthogonal_(module.weight, gain=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def new_state(config: TrainConfig, device: torch.device) -> TrainState:
    """A fresh model (published init unless disabled), its EMA copy, Adam and the MultiStep schedule."""
    model = UNet3D(config.network.unet(config.data.max_tr))
    if config.init.orthogonal:
        orthogonal_init_(model)
        if config.network.prediction == "residual":
            # A residual network starts as exact interpolation: the orthogonal init of the output
            # convolution would start it from a random correction of the size of the signal.
            nn.init.zeros_(model.out[-1].weight)
    model.gradient_checkpointing = config.runtime.gradient_checkpointing
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optim = config.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, optim.milestone_steps(), gamma=optim.lr_gamma)
    return TrainState(model, ema, optimizer, scheduler)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, optim: OptimConfig) -> None:
    """The published EMA, called after optimiser step number ``step`` (0-based).

    Every ``ema_every`` steps: before ``ema_start`` a plain copy of the weights, from then on
    ``ema = decay * ema + (1 - decay) * model`` over the parameters.
    """
    if step % optim.ema_every:
        return
    if step < optim.ema_start:
        ema.load_state_dict(model.state_dict())
        return
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current.detach(), 1.0 - optim.ema_decay)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG state (CPU, and the CUDA device it trains on)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_checkpoint(
    path: Path,
    state: TrainState,
    config: TrainConfig,
    *,
    data_state: dict[str, int],
    rng_states: list[dict[str, Any]],
) -> Path:
    """A resumable checkpoint (written atomically by `model.checkpoint.save_checkpoint`)."""
    return save_checkpoint(
        path,
        state.model,
        ema=state.ema,
        step=state.step,
        schedule=config.diffusion.schedule_info(),
        extra={
            "config": config.to_dict(),
            "training": {
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "data": dict(data_state),
                "rng": rng_states,
            },
        },
    )


def _training_payload(path: Path) -> dict[str, Any]:
    ckpt = read_checkpoint(path, prefer="model")
    raw = ckpt.raw
    if ckpt.source_format != "ctp-node" or "training" not in raw or "ema" not in raw:
        raise CheckpointError(
            f"{path} holds weights but no training state (optimiser, step, EMA) to resume; to fine-tune from it, "
            "set init.weights in the configuration (or pass --finetune)"
        )
    return raw


def config_from_checkpoint(path: Path) -> TrainConfig:
    """The training configuration stored in a resumable checkpoint."""
    raw = _training_payload(Path(path))
    return parse_config(dict(raw["config"]), source=f"stored in {path}")


def resume_state(path: Path, state: TrainState, config: TrainConfig) -> dict[str, Any]:
    """Load a resumable checkpoint into ``state``; returns its ``training`` section (data, RNG)."""
    raw = _training_payload(path)
    stored = parse_config(dict(raw["config"]), source=f"stored in {path}")
    if stored.network != config.network:
        raise CheckpointError(
            f"{path} was trained with network {stored.network.model_dump()} but the configuration asks for "
            f"{config.network.model_dump()}; resume with the stored configuration or fine-tune instead"
        )
    state.model.load_state_dict(raw["model"])
    state.ema.load_state_dict(raw["ema"])
    training = raw["training"]
    state.optimizer.load_state_dict(training["optimizer"])
    state.scheduler.load_state_dict(training["scheduler"])
    state.step = int(raw["step"])
    return training


def finetune_state(path: Path, state: TrainState) -> list[str]:
    """Load any checkpoint's weights (``ema`` when present) into both model and EMA; returns notes."""
    ckpt = read_checkpoint(path)
    if ckpt.config != state.model.config:
        raise CheckpointError(
            f"{path} holds a network {ckpt.config.to_dict()}, but the configuration's [network] is "
            f"{state.model.config.to_dict()}; set [network] to the checkpoint's architecture"
        )
    weights = build_denoiser(ckpt, path).state_dict()
    state.model.load_state_dict(weights)
    state.ema.load_state_dict(weights)
    return [f"fine-tuning from {path} ({ckpt.source_format} format, '{ckpt.weights_key}' weights)", *ckpt.notes]


def export_inference(checkpoint: str | Path, output: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An inference-only checkpoint: the EMA weights (``model`` if there is no EMA) in ``dtype``.

    Holds no optimiser or training state; `model.load_denoiser` reads it (upcasting to float32).
    """
    ckpt = read_checkpoint(checkpoint, prefer="ema")
    net = build_denoiser(ckpt, checkpoint)
    return save_checkpoint(
        output,
        net,
        step=ckpt.step or 0,
        schedule=ckpt.schedule,
        dtype=dtype,
        extra={"exported_from": str(checkpoint), "weights": ckpt.weights_key},
    )
