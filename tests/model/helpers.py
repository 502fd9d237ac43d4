"""Small networks and checkpoints for CPU tests."""

from __future__ import annotations

import torch

from model.unet import UNet3D, UNetConfig

TINY = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2, 4), attention_resolutions=(4,))


def tiny_net(seed: int = 0, config: UNetConfig = TINY) -> UNet3D:
    """A tiny network with non-zero output layers, so tests see real outputs (not the zero init)."""
    torch.manual_seed(seed)
    net = UNet3D(config)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.Conv1d)) and not module.weight.any():
                module.weight.normal_(0, 0.02)
    return net.eval()


def published_state(net: UNet3D, schedule_buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict as the published code stores it: DataParallel(GaussianDiffusion)."""
    state = {f"module.{k}": v.float() for k, v in (schedule_buffers or {}).items()}
    state.update({f"module.denoise_fn.{k}": v for k, v in net.state_dict().items()})
    return state
