"""One validated training configuration, read from a TOML file.

Sections (each a frozen pydantic model; unknown keys are errors): ``[network]`` (UNetConfig
fields), ``[diffusion]`` (noise schedule and loss), ``[data]`` (+ ``[data.phantom]``), ``[optim]``
(the published recipe by default), ``[runtime]`` (device, precision, intervals, output folder) and
``[init]`` (weight initialisation, fine-tuning or resuming). Every default is the published value,
so an empty file plus a data folder reproduces the published training. Relative paths are taken
from the current directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.planner import PUBLISHED_MAX_TR
from model.schedule import (
    PUBLISHED_LINEAR_END,
    PUBLISHED_LINEAR_START,
    PUBLISHED_SCHEDULE,
    PUBLISHED_TIMESTEPS,
    NoiseSchedule,
)
from model.unet import UNetConfig
from training.samples import validate_gap_weights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class TrainingConfigError(ValueError):
    """The training configuration cannot be used; the message names the file, key and fix.

    Not ``ctp_node.errors.ConfigError`` (the node's configuration): ``training/`` does not import the
    node, and a bad training file is not a node fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkConfig(_Section):
    """The denoiser's architecture (defaults: the published 103,987,457-parameter network)."""

    model_channels: int = Field(64, gt=0)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = Field(3, gt=0)
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_heads: int = Field(1, gt=0)
    norm_groups: int = Field(32, gt=0)  # group norm groups; every level's channels must divide by it
    # The network's output: noise (published), clean target, or clean target as interpolation plus a
    # learned correction (model.unet.UNetConfig.prediction).
    prediction: Literal["eps", "x0", "residual"] = "eps"

    @model_validator(mode="after")
    def _buildable(self) -> NetworkConfig:
        self.unet()  # UNetConfig's own checks (group norm divisibility, ...) raise ValueError
        return self

    def unet(self, max_tr: int = PUBLISHED_MAX_TR) -> UNetConfig:
        # Only a residual network reads max_tr (to place the target between its neighbours); the
        # others keep the published value so that their configurations compare equal to checkpoints'.
        return UNetConfig(**self.model_dump(), max_tr=max_tr if self.prediction == "residual" else PUBLISHED_MAX_TR)


class DiffusionConfig(_Section):
    """Noise schedule and training loss (SR3 continuous noise level)."""

    schedule: Literal["linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine"] = PUBLISHED_SCHEDULE
    timesteps: int = Field(PUBLISHED_TIMESTEPS, gt=0)
    linear_start: float = Field(PUBLISHED_LINEAR_START, gt=0.0, lt=1.0)
    linear_end: float = Field(PUBLISHED_LINEAR_END, gt=0.0, lt=1.0)
    loss: Literal["l1", "l2"] = "l1"

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.build(self.schedule, self.timesteps, self.linear_start, self.linear_end)

    def schedule_info(self) -> dict[str, Any]:
        """What a checkpoint records about the schedule the model was trained with."""
        return {
            "schedule": self.schedule,
            "timesteps": self.timesteps,
            "beta_start": self.linear_start,
            "beta_end": self.linear_end,
        }


class PhantomDataConfig(_Section):
    """Digital phantom studies drawn on the fly: each study has random anatomy fields, lesion,
    noise and timing; ``samples_per_study`` tuples are drawn from one study before the next."""

    matrix: int = Field(192, ge=32)
    slices: int = Field(8, ge=1)
    duration_s: tuple[int, int] = (45, 61)
    onset_shift_s: tuple[int, int] = (0, 8)
    noise_hu: tuple[float, float] = (0.0, 10.0)
    # Variety the phantom's one anatomy lacks: head size on the fixed model grid (the phantom's field
    # of view, mm: a wider field shows a smaller head) and noise texture (in-plane correlation of the
    # noise, mm, from sharp to smooth reconstruction kernels).
    fov_mm: tuple[float, float] = (240.0, 240.0)
    noise_correlation_mm: tuple[float, float] = (0.7, 0.7)
    lesion_probability: float = Field(0.7, ge=0.0, le=1.0)
    # Train towards the same study without noise (the posterior mean a synthetic second estimates)
    # instead of towards the noisy target second; the neighbours stay noisy, as at inference.
    noise_free_target: bool = False
    samples_per_study: int = Field(32, gt=0)
    val_studies: int = Field(2, ge=0)
    # In-plane training crop (pixels; None = whole slices). The network is fully convolutional, so
    # crops centred on random brain voxels train the same weights at a fraction of the cost per item
    # (what makes CPU training possible); validation and inference always see whole volumes.
    crop: int | None = Field(None, ge=16)

    @field_validator("duration_s", "onset_shift_s", "noise_hu", "fov_mm", "noise_correlation_mm")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if low < 0 or high < low:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _crop_fits(self) -> PhantomDataConfig:
        if self.crop is not None and self.crop > self.matrix:
            raise ValueError(f"crop {self.crop} is larger than the matrix {self.matrix}")
        return self

    @field_validator("duration_s")
    @classmethod
    def _long_enough(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 3:
            raise ValueError(f"studies need at least 3 seconds to hold one training tuple, got {value[0]}")
        return value


class DataConfig(_Section):
    """Where training tuples come from.

    ``kind = "npy"``: ``root`` holds ``train/`` and optionally ``val/`` with ``.npy`` sequences shaped
    (depth, H, W, T) at 1 s, windowed HU 0..80 (the published layout, ``volume_shape`` (8, 192, 192)).
    Without ``val/``, ``val_fraction`` of the training files (by sorted name) are held out.
    ``kind = "phantom"``: studies generated on the fly (``[data.phantom]``); the volume shape is
    (slices, matrix, matrix).
    """

    kind: Literal["npy", "phantom"] = "npy"
    root: Path | None = None
    volume_shape: tuple[int, int, int] = (8, 192, 192)
    max_tr: int = Field(PUBLISHED_MAX_TR, ge=3)
    gap_weights: dict[int, float] | None = None
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    phantom: PhantomDataConfig = PhantomDataConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.kind == "npy" and self.root is None:
            raise ValueError("data.kind = 'npy' needs data.root, the folder holding train/ (and val/)")
        if self.gap_weights is not None:
            validate_gap_weights(self.gap_weights, self.max_tr)
        if any(s <= 0 for s in self.volume_shape):
            raise ValueError(f"volume_shape must be positive, got {list(self.volume_shape)}")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depth, H, W) of one volume."""
        if self.kind == "phantom":
            return (self.phantom.slices, self.phantom.matrix, self.phantom.matrix)
        return self.volume_shape


class OptimConfig(_Section):
    """The published recipe: Adam lr 1e-4, x0.1 at 1/3 and 2/3 of the iterations, batch 20, EMA 0.995
    updated every 10 steps from step 2000 (a plain copy of the weights before)."""

    lr: float = Field(1e-4, gt=0.0)
    lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    batch_size: int = Field(20, gt=0)
    iterations: int = Field(600_000, gt=0)
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    ema_every: int = Field(10, gt=0)
    ema_start: int = Field(2000, ge=0)

    @field_validator("lr_milestones")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < f < 1.0 for f in value) or list(value) != sorted(value):
            raise ValueError(f"lr_milestones are increasing fractions of the iterations in (0, 1), got {list(value)}")
        return value

    def milestone_steps(self) -> list[int]:
        """Iterations after which the learning rate is multiplied by ``lr_gamma``."""
        return [max(1, round(f * self.iterations)) for f in self.lr_milestones]


class RuntimeConfig(_Section):
    """How and where a run executes; none of this changes what is learnt (except ``seed``)."""

    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(5000, gt=0)
    keep_every: int = Field(0, ge=0)
    val_every: int = Field(5000, ge=0)
    val_batches: int = Field(4, gt=0)
    sample_every: int = Field(5000, ge=0)
    sample_steps: int = Field(20, gt=0)
    output: Path = Path("runs/ctp-node")
    progress: bool = True


class InitConfig(_Section):
    """Where the weights start: published orthogonal init, fine-tuning, or resuming a run.

    ``orthogonal``: orthogonal init of every conv and linear weight (biases zero), which overrides
    the zero init of the output layers, as published. ``weights``: fine-tune from any checkpoint
    (published format or ctp-node; ``ema`` weights when present) into both model and EMA, with a fresh
    optimiser at step 0. ``resume``: continue a ctp-node training checkpoint at its step, with its
    optimiser, scheduler, EMA and random state.
    """

    orthogonal: bool = True
    weights: Path | None = None
    resume: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InitConfig:
        if self.weights is not None and self.resume is not None:
            raise ValueError("set either init.weights (fine-tune) or init.resume (continue a run), not both")
        return self


class TrainConfig(_Section):
    """The whole configuration of one training run."""

    network: NetworkConfig = NetworkConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    init: InitConfig = InitConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible values (paths as strings), as stored inside checkpoints."""
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A validated copy with dotted keys replaced, e.g. ``{"optim.iterations": 10}``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for name in parents:
                node = node[name]
            node[leaf] = str(value) if isinstance(value, Path) else value
        return parse_config(data, source="overrides")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check its spelling and section)")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    """Validate a configuration mapping; errors list every bad key."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainingConfigError(f"invalid training configuration {source}:\n{_describe(exc)}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training configuration."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"training configuration {path} does not exist (see training/configs/ for examples)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TrainingConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))
