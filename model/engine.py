"""The inpainting engine: every missing second of one study, batched on the GPU.

Input and output are model-space arrays (D, H, W per volume, values in [-1, 1]); the engine knows
nothing about DICOM or files. Known seconds are returned exactly as given; synthetic seconds are
multiplied by the published tissue mask (outside it: -1, i.e. 0 HU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from model.baseline import interpolate_seconds
from model.checkpoint import CheckpointInfo, LoadedModel
from model.device import Precision, auto_batch_size, autocast, autocast_dtype, choose_device
from model.loss import eps_from_output
from model.planner import (
    PUBLISHED_MAX_TR,
    FillPlan,
    InpaintPlan,
    LongGapPolicy,
    Target,
    condition_targets,
    plan_seconds,
)
from model.progress import ProgressFn
from model.samplers import SAMPLER_FUNCTIONS, SAMPLERS, SPACINGS, ScheduleLike, ScheduleSpec, Spacing
from model.unet import UNet3D, network_input
from model.window import PUBLISHED_MASK_MIN_VOXELS, from_model_space, tissue_mask

log = logging.getLogger(__name__)


# The global default when neither the user nor the checkpoint names a sampler: DPM-Solver++(2M), 20
# steps, a safe choice for any eps-predicting network (docs/benchmarks.md, sampler tuning).
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 20


@dataclass(frozen=True)
class SamplingChoice:
    """The sampler and steps to run, and where each came from (for logs and reports)."""

    sampler: str
    steps: int
    source: str  # e.g. "given", "checkpoint's recommendation", "default"

    def describe(self) -> str:
        return f"{self.sampler}, {self.steps} steps ({self.source})"


def choose_sampling(sampler: str | None, steps: int | None, recommended: object | None = None) -> SamplingChoice:
    """What the user gave wins; what it leaves open comes from the checkpoint's recommendation
    (``model.checkpoint.SamplerRecommendation``), else from the global default.

    Steps are recommended for one sampler: a user who names another sampler and no steps gets the
    default steps (20), not steps tuned for a different integrator.
    """
    rec_sampler = getattr(recommended, "sampler", None)
    rec_steps = getattr(recommended, "steps", None)
    names = {"given": "given", "checkpoint": "checkpoint's recommendation", "default": "default"}
    if sampler is not None:
        chosen_sampler, sampler_from = sampler, "given"
    elif rec_sampler is not None:
        chosen_sampler, sampler_from = rec_sampler, "checkpoint"
    else:
        chosen_sampler, sampler_from = DEFAULT_SAMPLER, "default"
    if steps is not None:
        chosen_steps, steps_from = steps, "given"
    elif rec_steps is not None and chosen_sampler == rec_sampler:
        chosen_steps, steps_from = rec_steps, "checkpoint"
    else:
        chosen_steps, steps_from = DEFAULT_STEPS, "default"
    if sampler_from == steps_from:
        source = names[sampler_from]
    else:
        source = f"sampler {names[sampler_from]}, steps {names[steps_from]}"
    return SamplingChoice(chosen_sampler, int(chosen_steps), source)


class ProgressLog:
    """A ``progress(done, total)`` callback that writes a line now and then instead of drawing a bar:
    for logs, and for a stderr that is not a terminal. A line at most every ``every_s`` seconds or
    every ``every_fraction`` of the work, whichever comes first, and one at the end.

    The engine counts volume-steps (targets x sampler steps); ``steps`` turns them into targets.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        label: str = "inpainting",
        *,
        steps: int = 1,
        every_s: float = 10.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.label = label
        self.steps = max(int(steps), 1)
        self.every_s = every_s
        self.every_fraction = every_fraction
        self.clock = clock
        self.started = self._last_time = clock()
        self._last_fraction = 0.0
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if total <= 0 or self._finished:
            return
        fraction = min(done / total, 1.0)
        due = (now - self._last_time >= self.every_s) or (fraction - self._last_fraction >= self.every_fraction)
        if not (due or fraction >= 1.0):
            return
        self._last_time, self._last_fraction = now, fraction
        self._finished = fraction >= 1.0
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        self.emit(
            f"{self.label}: {done // self.steps}/{total // self.steps} targets ({fraction:.0%}), "
            f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s"
        )


@dataclass(frozen=True)
class EngineSettings:
    """How the engine samples. Defaults are the fast path; the published one is
    ``sampler="ancestral", steps=1500, batch_size=1, precision="fp32"``."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    spacing: Spacing = "logsnr"
    batch_size: int | None = None  # None: as many targets per pass as memory allows
    precision: Precision = "auto"
    compile: bool | None = None  # None: on for CUDA (falls back to eager if compilation fails), off for CPU
    max_memory_gib: float = 20.0
    seed: int = 0
    n_samples: int = 1
    max_tr: int = PUBLISHED_MAX_TR
    long_gap: LongGapPolicy = "error"
    mask_min_voxels: int = PUBLISHED_MASK_MIN_VOXELS

    def __post_init__(self) -> None:
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            problems.append(f"spacing {self.spacing!r} is not one of {', '.join(SPACINGS)}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_samples < 1:
            problems.append(f"n_samples must be >= 1, got {self.n_samples}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision {self.precision!r} is not one of auto, bf16, fp32")
        if problems:
            raise ValueError("invalid engine settings: " + "; ".join(problems))


@dataclass
class InpaintResult:
    """The full 1 s sequence of one sequence (slab) and what each second is."""

    sequence: np.ndarray  # (T1, D, H, W) float32, model space
    times_s: np.ndarray  # (T1,) absolute seconds, same clock as the input times
    synthetic: np.ndarray  # (T1,) bool: sampled by the model
    fallback: np.ndarray  # (T1,) bool: linear interpolation under the long-gap policy
    tissue_mask: np.ndarray  # (D, H, W) bool
    plan: InpaintPlan
    spread: np.ndarray | None = None  # (T1, D, H, W) per-voxel std over n_samples draws
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def acquired(self) -> np.ndarray:
        return ~(self.synthetic | self.fallback)

    @property
    def fill(self) -> FillPlan:
        return self.plan.fill


@dataclass
class StudyInpaint:
    """Every sequence (8-slice slab) of one study on the 1 s grid, and the ONE record of what fills
    each second (``fill``), planned once per study. ``plans``: each sequence's conditioning (its own
    peak); ``tissue_masks`` and ``spreads`` per sequence (empty for an engine without either)."""

    sequences: list[np.ndarray]  # per sequence (T1, D, H, W) float32, model space
    fill: FillPlan
    plans: list[InpaintPlan] = field(default_factory=list)
    tissue_masks: list[np.ndarray] = field(default_factory=list)
    spreads: list[np.ndarray | None] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def times_s(self) -> np.ndarray:
        return self.fill.times_s

    def result(self, i: int) -> InpaintResult:
        """Sequence ``i`` as a single-sequence result."""
        return InpaintResult(
            sequence=self.sequences[i],
            times_s=self.fill.times_s,
            synthetic=self.fill.synthetic,
            fallback=self.fill.fallback,
            tissue_mask=self.tissue_masks[i],
            plan=self.plans[i],
            spread=self.spreads[i],
            timings_s=dict(self.timings_s),
        )


class StudyInpainter(Protocol):
    """What the series pipeline needs from an engine: the ``Inpainter``, or ``LinearInpainter``."""

    def inpaint_study(
        self,
        sequences: Sequence[np.ndarray],
        times_s: Sequence[float] | np.ndarray,
        *,
        usable: Sequence[bool] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> StudyInpaint: ...


class LinearInpainter:
    """The engine's stand-in without a network: every missing second by linear interpolation of the
    given volumes, with no gap limit (interpolation has no trained range). On the node's path it
    measures what the path itself costs."""

    def inpaint_study(
        self,
        sequences: Sequence[np.ndarray],
        times_s: Sequence[float] | np.ndarray,
        *,
        usable: Sequence[bool] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> StudyInpaint:
        started = time.perf_counter()
        fill = plan_seconds(times_s, usable=usable, max_tr=np.iinfo(np.int32).max, long_gap="error")
        seconds = [int(s) for s in fill.seconds]
        filled = [interpolate_seconds(fill, np.asarray(v), seconds) for v in sequences]
        if progress is not None:
            progress(1, 1)
        return StudyInpaint(filled, fill, timings_s={"total": time.perf_counter() - started})


def _target_noise(seed: int, sequence: int, target: Target, sample: int, shape: Sequence[int]) -> torch.Tensor:
    """Initial noise of one target, seeded by (seed, sequence, second, draw): independent of batching."""
    gen = torch.Generator().manual_seed(
        (seed * 1_000_003 + sequence * 7_919_993 + target.second * 1_009 + sample) % (2**63)
    )
    return torch.randn((1, *shape), generator=gen)


class Inpainter:
    """Inpaints studies with one loaded denoiser; build once, call ``inpaint_study`` per study.

    ``model``: a ``LoadedModel`` (``model.checkpoint.load_denoiser``), whose checkpoint's noise schedule
    is sampled with, or a bare network (the published schedule). ``schedule`` overrides either.
    """

    def __init__(
        self,
        model: UNet3D | LoadedModel,
        settings: EngineSettings | None = None,
        *,
        device: str | torch.device | None = None,
        schedule: ScheduleLike | None = None,
    ) -> None:
        self.checkpoint: CheckpointInfo | None = model.info if isinstance(model, LoadedModel) else None
        net = model.net if isinstance(model, LoadedModel) else model
        self.settings = settings or EngineSettings()
        self.device = choose_device(str(device) if device is not None else None)
        self.dtype = autocast_dtype(self.device, self.settings.precision)
        if schedule is None:
            schedule = self.checkpoint.noise_schedule if self.checkpoint is not None else ScheduleSpec()
        self.schedule: ScheduleLike = schedule
        # Channels-last 3D lets oneDNN pick its blocked convolutions on CPU: 1.3x faster forwards
        # at 8 x 192 x 192 on this project's 2-core VM, same float32 arithmetic.
        self.memory_format = torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        self.net = net.to(self.device, memory_format=self.memory_format).eval()
        self.prediction = getattr(getattr(net, "config", None), "prediction", "eps")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        use_compile = self.settings.compile if self.settings.compile is not None else self.device.type == "cuda"
        self._compiled = torch.compile(self.net) if use_compile else None
        self._compile_verified = False
        self._batch_sizes: dict[tuple[int, ...], int] = {}

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.net(*args)
        if self._compile_verified:
            return self._compiled(*args)
        try:
            out = self._compiled(*args)
        except Exception as exc:  # compilation needs a toolchain a site may lack: run eagerly instead
            log.warning("torch.compile failed (%s: %s); running the network eagerly", type(exc).__name__, exc)
            self._compiled = None
            return self.net(*args)
        self._compile_verified = True
        return out

    def _eps_fn(
        self, left: torch.Tensor, right: torch.Tensor, local: torch.Tensor, scenario: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def eps(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.dtype):
                stacked = network_input(left, x, right).contiguous(memory_format=self.memory_format)
                out = self._forward(stacked, local, scenario, g)
            return eps_from_output(out.float(), x, g, self.prediction)

        return eps

    def _sample(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        pass_seed: int,
        on_step: ProgressFn | None,
    ) -> torch.Tensor:
        s = self.settings
        gen = torch.Generator(device=self.device).manual_seed(pass_seed)
        sampler = SAMPLER_FUNCTIONS[s.sampler]
        return sampler(eps_fn, x, self.schedule, s.steps, spacing=s.spacing, generator=gen, callback=on_step)

    def batch_size_for(self, n_items: int, volume_shape: Sequence[int]) -> int:
        """The configured batch size, or the largest that fits the memory budget (measured once per shape)."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        key = (n_items, *volume_shape)
        if key in self._batch_sizes:
            return self._batch_sizes[key]

        def probe(batch: int) -> None:
            d, h, w = volume_shape
            x = torch.zeros((batch, 3, d, h, w), device=self.device)
            ctx = torch.zeros((batch, 2), device=self.device)
            scen = torch.zeros((batch, 3), device=self.device)
            g = torch.ones((batch,), device=self.device)
            with torch.inference_mode(), autocast(self.device, self.dtype):
                self.net(x, ctx, scen, g)

        self._batch_sizes[key] = auto_batch_size(
            probe, self.device, n_items, max_memory_gib=self.settings.max_memory_gib
        )
        return self._batch_sizes[key]

    def inpaint(
        self,
        volumes: np.ndarray,
        times_s: Sequence[float] | np.ndarray,
        *,
        usable: Sequence[bool] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> InpaintResult:
        """Synthesise every missing second between the acquired ``volumes`` (N, D, H, W) in [-1, 1].

        ``progress(done, total)`` is called after each network evaluation with counts of
        volume-steps, so a caller can show a bar.
        """
        return self.inpaint_study([volumes], times_s, usable=usable, progress=progress).result(0)

    def inpaint_study(
        self,
        sequences: Sequence[np.ndarray],
        times_s: Sequence[float] | np.ndarray,
        *,
        usable: Sequence[bool] | np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> StudyInpaint:
        """Several sequences acquired at the same times (the 8-slice slabs of one study), their targets
        sampled together so a study with several slabs still needs as few passes as memory allows.

        What fills each second is planned once for the study (it depends on the times alone); each
        sequence's targets are conditioned on its own frame sums (the peak rule), as the published
        model sees one 8-slice sequence at a time.
        """
        s = self.settings
        t_start = time.perf_counter()
        arrays = [self._checked(v, times_s) for v in sequences]
        fill = plan_seconds(times_s, usable=usable, max_tr=s.max_tr, long_gap=s.long_gap)
        plans, masks = [], []
        for volumes in arrays:
            windowed = from_model_space(volumes)
            plans.append(condition_targets(fill, windowed.reshape(len(volumes), -1).sum(axis=1)))
            masks.append(tissue_mask(windowed[fill.input_second >= 0], s.mask_min_voxels))
        for note in fill.notes:
            log.info("plan: %s", note)
        samples = self._sample_targets(arrays, plans, progress)
        elapsed = time.perf_counter() - t_start
        filled = [
            self._assemble(volumes, plan, mask, sample)
            for volumes, plan, mask, sample in zip(arrays, plans, masks, samples)
        ]
        return StudyInpaint(
            sequences=[sequence for sequence, _ in filled],
            fill=fill,
            plans=plans,
            tissue_masks=masks,
            spreads=[spread for _, spread in filled],
            timings_s={"total": elapsed},
        )

    @staticmethod
    def _checked(volumes: np.ndarray, times_s: Sequence[float] | np.ndarray) -> np.ndarray:
        volumes = np.asarray(volumes, dtype=np.float32)
        if volumes.ndim != 4:
            raise ValueError(f"volumes must be shaped (N, D, H, W), got {volumes.shape}")
        if volumes.shape[0] != len(times_s):
            raise ValueError(f"got {volumes.shape[0]} volumes but {len(times_s)} times")
        if not np.all(np.isfinite(volumes)):
            raise ValueError("volumes contain NaN or infinite values")
        if volumes.min() < -1.0001 or volumes.max() > 1.0001:
            raise ValueError(
                f"volumes must be in model space [-1, 1] (got {volumes.min():.3g}..{volumes.max():.3g}); "
                "convert windowed HU with model.window.to_model_space"
            )
        return volumes

    def _assemble(
        self, volumes: np.ndarray, plan: InpaintPlan, mask: np.ndarray, samples: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The 1 s sequence: acquired seconds as given, synthetic ones masked, long gaps interpolated."""
        sequence = np.empty((len(plan.seconds), *volumes.shape[1:]), dtype=np.float32)
        used = plan.input_second >= 0
        for i in np.flatnonzero(used):
            sequence[plan.index(int(plan.input_second[i]))] = volumes[i]
        if plan.fallback_seconds:
            filled = interpolate_seconds(plan, volumes, plan.fallback_seconds)
            for sec, vol in zip(plan.fallback_seconds, filled):
                sequence[plan.index(sec)] = vol
        spread = None
        if samples is not None:
            masked = np.where(mask[None, None], samples, np.float32(-1.0))
            for k, target in enumerate(plan.targets):
                sequence[plan.index(target.second)] = masked[0, k]
            if self.settings.n_samples > 1:
                spread = np.zeros_like(sequence)
                std = masked.std(axis=0)
                for k, target in enumerate(plan.targets):
                    spread[plan.index(target.second)] = std[k]
        return sequence, spread

    @torch.inference_mode()
    def _sample_targets(
        self, sequences: list[np.ndarray], plans: list[InpaintPlan], progress: ProgressFn | None
    ) -> list[np.ndarray | None]:
        """Per sequence, (n_samples, n_targets, D, H, W) model-space samples, or None when nothing is missing."""
        s = self.settings
        shape = sequences[0].shape[1:]
        if any(v.shape[1:] != shape for v in sequences):
            raise ValueError("all sequences sampled together must have the same volume shape")
        out: list[np.ndarray | None] = [
            np.empty((s.n_samples, len(p.targets), *shape), dtype=np.float32) if p.targets else None for p in plans
        ]
        # One row per known volume of every sequence; a job is (sequence, target index, target, draw).
        offsets = np.cumsum([0] + [len(v) for v in sequences[:-1]])
        rows = [
            {int(sec): int(offsets[q]) + i for i, sec in enumerate(plan.input_second) if sec >= 0}
            for q, plan in enumerate(plans)
        ]
        jobs = [
            (q, k, target, sample)
            for q, plan in enumerate(plans)
            for sample in range(s.n_samples)
            for k, target in enumerate(plan.targets)
        ]
        if not jobs:
            return out
        known = torch.from_numpy(np.concatenate(sequences)).to(self.device)
        batch = self.batch_size_for(len(jobs), shape)
        total = len(jobs) * s.steps
        done = 0
        for start in range(0, len(jobs), batch):
            real = jobs[start : start + batch]
            # Every pass has the same shape (the last one padded with repeats) so cuDNN autotuning and
            # torch.compile see one shape; per-target seeds keep the repeats from changing anything.
            chunk = real + [real[-1]] * (batch - len(real))
            left = known[[rows[q][t.left] for q, _, t, _ in chunk]].unsqueeze(1)
            right = known[[rows[q][t.right] for q, _, t, _ in chunk]].unsqueeze(1)
            local = torch.tensor([t.local_context for _, _, t, _ in chunk], device=self.device)
            scenario = torch.tensor([t.global_context for _, _, t, _ in chunk], device=self.device)
            x = torch.cat([_target_noise(s.seed, q, t, n, shape) for q, _, t, n in chunk])
            x = x.unsqueeze(1).to(self.device)

            def on_step(step: int, _total: int, n: int = len(real), base: int = done) -> None:
                if progress is not None:
                    progress(base + step * n, total)

            result = self._sample(self._eps_fn(left, right, local, scenario), x, s.seed + start, on_step)
            done += len(real) * s.steps
            result_np = result.squeeze(1).float().cpu().numpy()
            for (q, k, _target, n), vol in zip(real, result_np):
                out[q][n, k] = vol  # type: ignore[index]
        return out
