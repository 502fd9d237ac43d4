"""The published 3D guided-diffusion UNet (Bae et al., MICCAI 2024).

Module names and nesting mirror the published code so that its state dicts load with no key
renaming (after the `module.denoise_fn.` prefix is stripped at the checkpoint boundary).

Called as ``net(x, local_context, global_context, noise_level)``:
- ``x``: (B, 3, D, H, W), channels ``[left known volume, noisy target, right known volume]`` in model
  space [-1, 1];
- ``local_context``: (B, 2), ``((t - l - 1) / (max_tr - 2), (r - t - 1) / (max_tr - 2))``;
- ``global_context``: (B, 3), one-hot contrast scenario (rising, around peak, falling);
- ``noise_level``: (B,) or (B, 1), the continuous noise level ``g = sqrt(alpha_bar)``.
It returns the predicted noise, (B, 1, D, H, W), or the clean target (``UNetConfig.prediction``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

PREDICTIONS = ("eps", "x0", "residual")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoiser; the defaults are the published network (103,987,457 parameters)."""

    in_channels: int = 3
    out_channels: int = 1
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 3
    # Downsampling factors at which self-attention follows each residual block.
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    num_heads: int = 1
    local_context_dim: int = 2
    num_scenarios: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    # What the output means: "eps", the noise (published); "x0", the clean target; "residual", the
    # clean target as the linear interpolation of the left and right volumes at the target's second
    # plus the network's correction (a zero correction is exactly interpolation, so an untrained or
    # briefly trained network starts with no offset and no sawtooth). The layers are the same;
    # samplers turn any of them into a noise estimate (model.loss.eps_from_output).
    prediction: str = "eps"
    # The largest gap of the local context's scale (published: 8 s); "residual" needs it to recover
    # the target's position between its neighbours from the local context.
    max_tr: int = 8
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        problems = []
        if self.model_channels <= 0 or self.num_res_blocks <= 0 or not self.channel_mult:
            problems.append("model_channels, num_res_blocks and channel_mult must be positive and non-empty")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                problems.append(
                    f"channels {self.model_channels * mult} are not divisible by {self.norm_groups} norm groups"
                )
        if self.model_channels % 2:
            problems.append("model_channels must be even (sin/cos noise-level embedding)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.prediction not in PREDICTIONS:
            problems.append(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.max_tr < 3:
            problems.append(f"max_tr must be >= 3, got {self.max_tr}")
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    @property
    def embed_dim(self) -> int:
        return 4 * self.model_channels

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["channel_mult"] = list(self.channel_mult)
        data["attention_resolutions"] = list(self.attention_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {unknown}")
        return cls(**data)


def interpolation_between(
    left: torch.Tensor, right: torch.Tensor, local_context: torch.Tensor, max_tr: int
) -> torch.Tensor:
    """Linear interpolation in time of ``left`` and ``right`` at the target's second, which the
    local context ``((t - l - 1) / (max_tr - 2), (r - t - 1) / (max_tr - 2))`` fixes:
    ``w = (t - l) / (r - l)``."""
    scale = float(max_tr - 2)
    before = local_context[:, 0].float() * scale + 1.0
    after = local_context[:, 1].float() * scale + 1.0
    weight = (before / (before + after)).reshape(-1, *([1] * (left.dim() - 1)))
    return left.float() + weight * (right.float() - left.float())


def network_input(left: torch.Tensor, target: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The network's ``x``: (B, 3, D, H, W) from three (B, 1, D, H, W) volumes, in the channel order it
    was trained with, ``[left known, (noisy) target, right known]``; training and inference both build it here."""
    return torch.cat([left, target, right], dim=1)


def noise_level_embedding(noise_level: torch.Tensor, dim: int) -> torch.Tensor:
    """SR3 positional encoding of the continuous noise level: ``[sin(g w_k), cos(g w_k)]``."""
    half = dim // 2
    step = torch.arange(half, dtype=torch.float32, device=noise_level.device) / half
    enc = noise_level.float().reshape(-1, 1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
    return torch.cat([torch.sin(enc), torch.cos(enc)], dim=-1)


class NoiseLevelEncoding(nn.Module):
    """Parameter-free first element of ``time_embed`` (keeps the published indices 1 and 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        return noise_level_embedding(noise_level, self.dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype, as the published code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int, cfg: UNetConfig) -> GroupNorm32:
    return GroupNorm32(cfg.norm_groups, channels, eps=cfg.norm_eps)


class ResBlock(nn.Module):
    """GN, SiLU, conv3 -> + projected embedding -> GN, SiLU, dropout, conv3 -> + skip."""

    def __init__(self, channels: int, out_channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels, cfg), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(3 * cfg.embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels, cfg),
            nn.SiLU(),
            nn.Dropout(p=cfg.dropout),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels else nn.Conv3d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Spatial self-attention over all D*H*W positions (published "legacy" head split)."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        if channels % cfg.num_heads:
            raise ValueError(f"{channels} channels do not split into {cfg.num_heads} heads")
        self.num_heads = cfg.num_heads
        self.norm = _norm(channels, cfg)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        length = qkv.shape[-1]
        head_ch = c // self.num_heads
        # Legacy order: heads are split first, then q, k, v within each head.
        q, k, v = qkv.reshape(b * self.num_heads, 3 * head_ch, length).split(head_ch, dim=1)
        # softmax(q k^T / sqrt(ch)) equals the published (q ch^-1/4)(k ch^-1/4) with a float32 softmax;
        # SDPA picks a fused kernel on GPU.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1), v.transpose(1, 2).unsqueeze(1)
        )
        h = out.squeeze(1).transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """3x3x3 convolution with stride 2 along all three axes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Trilinear upsampling to the size of the matching encoder level, then a 3x3x3 convolution.

    The published rule (x2 in all axes, except only H and W when depth is 1 and H < 24) is exactly
    "back to the encoder's size" for 8x192x192 inputs; taking the size from the skip tensor gives the
    same numbers there and lets smaller volumes (tests, tiny networks) through.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        return self.conv(x)


class EmbedSequential(nn.ModuleList):
    """One UNet stage: residual blocks take the embedding, upsampling takes the skip's size."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, up_size: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, Upsample):
                assert up_size is not None
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNet3D(nn.Module):
    """3D UNet conditioned on noise level, local context and contrast scenario; predicts the noise
    (published) or the clean target (``config.prediction``)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        ch0, emb = cfg.model_channels, cfg.embed_dim
        self.gradient_checkpointing = False

        self.time_embed = nn.Sequential(NoiseLevelEncoding(ch0), nn.Linear(ch0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.local_context_embed = nn.Sequential(nn.Linear(cfg.local_context_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.global_context_embed_matrix = nn.Parameter(torch.randn(cfg.num_scenarios, emb) / math.sqrt(emb))

        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv3d(cfg.in_channels, ch0, 3, padding=1)])])
        skip_channels = [ch0]
        ch, ds = ch0, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ch0 * mult, cfg)]
                ch = ch0 * mult
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg))
                self.input_blocks.append(EmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential([ResBlock(ch, ch, cfg), AttentionBlock(ch, cfg), ResBlock(ch, ch, cfg)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ch0 * mult, cfg)]
                ch = ch0 * mult
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))

        self.out = nn.Sequential(_norm(ch, cfg), nn.SiLU(), nn.Conv3d(ch0, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def embed(
        self, local_context: torch.Tensor, global_context: torch.Tensor, noise_level: torch.Tensor
    ) -> torch.Tensor:
        """The 3E conditioning vector every residual block projects: [noise level, local, global]."""
        return torch.cat(
            [
                self.time_embed(noise_level),
                self.local_context_embed(local_context.float()),
                global_context.float() @ self.global_context_embed_matrix,
            ],
            dim=-1,
        )

    def _run(self, block: EmbedSequential, h: torch.Tensor, emb: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return activation_checkpoint(block, h, emb, *args, use_reentrant=False)
        return block(h, emb, *args)

    def forward(
        self,
        x: torch.Tensor,
        local_context: torch.Tensor,
        global_context: torch.Tensor,
        noise_level: torch.Tensor,
    ) -> torch.Tensor:
        emb = self.embed(local_context, global_context, noise_level)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            skip = skips.pop()
            h = torch.cat([h, skip.to(h.dtype)], dim=1)
            up_size = tuple(skips[-1].shape[2:]) if skips else None
            h = self._run(block, h, emb, up_size)
        out = self.out(h)
        if self.config.prediction == "residual":
            base = interpolation_between(x[:, 0:1], x[:, 2:3], local_context, self.config.max_tr)
            out = (base + out.float()).to(out.dtype)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
