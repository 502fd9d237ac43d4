"""The path of one series, as plain functions over plain data (docs/architecture.md):

    assemble -> to_model_grid -> inpaint (per 8-slice slab) -> from_model_grid -> guardrail -> write derived

Shared by the worker (``make_processor``), ``ctp-node process`` and ``ctp-node reprocess``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctp_node import __version__
from ctp_node.config import GuardrailSettings, ModelSettings, OutputSettings, Settings
from ctp_node.errors import NotCTPError
from ctp_node.node.jobs import SeriesJob
from ctp_node.series.assemble import assemble_series
from ctp_node.series.derived import NODE_MANUFACTURER as DERIVED_MANUFACTURER
from ctp_node.series.derived import DerivedRecipe, DerivedSeries, write_derived_series
from ctp_node.series.grid import back_to_source, to_model_grid
from ctp_node.series.guardrail import GuardrailVerdict, check_series, fall_back
from model import EngineSettings, Inpainter, load_denoiser
from model.checkpoint import recommendation_of
from model.engine import ProgressLog, SamplingChoice, choose_sampling

log = logging.getLogger(__name__)
MODEL_NAME = "CTP temporal inpainting diffusion (Bae et al. MICCAI 2024)"

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineResult:
    derived: DerivedSeries
    times_s: np.ndarray
    synthetic: np.ndarray
    interpolated: np.ndarray
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    guardrail: GuardrailVerdict | None = None


def checkpoint_id(path: Path) -> str:
    """File name and the first 12 hex digits of its SHA-256: names the weights in every image."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name[:48]} sha256:{digest.hexdigest()[:12]}"


def engine_settings(model: ModelSettings, sampling: SamplingChoice | None = None) -> EngineSettings:
    """The engine's settings; ``sampling``: the resolved sampler and steps (default: the configured
    ones, else the global default, ignoring any checkpoint recommendation)."""
    sampling = sampling or choose_sampling(model.sampler, model.steps)
    return EngineSettings(
        sampler=sampling.sampler, steps=sampling.steps, spacing=model.spacing, batch_size=model.batch_size,
        precision=model.precision, compile=model.compile, max_memory_gib=model.max_memory_gib, seed=model.seed,
        long_gap=model.long_gap,
    )  # fmt: skip


def default_checkpoint() -> Path:
    """The shipped demo weights, for a node without ``[model] checkpoint``; loudly, since their
    output must not be mistaken for the published model's."""
    from model.checkpoint import DEMO_WEIGHTS

    if not DEMO_WEIGHTS.is_file():
        raise FileNotFoundError(
            "no model checkpoint configured and no demo weights shipped at "
            f"{DEMO_WEIGHTS}: set [model] checkpoint in the configuration (or CTP_NODE_MODEL__CHECKPOINT) "
            "to the published weights or a ctp-node checkpoint"
        )
    log.warning(
        "no [model] checkpoint configured: using the demo weights %s, trained on simulated phantom studies "
        "only (model/weights/MODEL_CARD.md); not for clinical use. Configure the published weights.",
        DEMO_WEIGHTS,
    )
    return DEMO_WEIGHTS


class SeriesPipeline:
    """A loaded model plus the output recipe; ``run`` turns the files of one series into a derived series."""

    def __init__(
        self,
        engine: Inpainter,
        recipe: DerivedRecipe,
        min_time_points: int = 3,
        guardrail: GuardrailSettings | None = None,
        sampling: SamplingChoice | None = None,
    ) -> None:
        self.engine = engine
        self.recipe = recipe
        self.min_time_points = min_time_points
        self.guardrail = guardrail or GuardrailSettings()
        # How the engine's sampler and steps were chosen (given, the checkpoint's, the default).
        self.sampling = sampling or SamplingChoice(engine.settings.sampler, engine.settings.steps, "given")

    @classmethod
    def from_settings(cls, settings: Settings, device: str | None = None) -> SeriesPipeline:
        model = settings.model
        checkpoint = model.checkpoint or default_checkpoint()
        net = load_denoiser(checkpoint)
        # Configured sampler/steps win; what they leave open comes from the checkpoint, else the default.
        sampling = choose_sampling(model.sampler, model.steps, recommendation_of(net))
        log.info("sampler %s", sampling.describe())
        engine = Inpainter(net, engine_settings(model, sampling), device=device or model.device)
        recipe = recipe_for(model, settings.output, checkpoint, sampling)
        return cls(engine, recipe, settings.series.min_time_points, settings.guardrail, sampling)

    def run(
        self,
        files: Sequence[Path],
        out_dir: Path,
        *,
        usable: np.ndarray | None = None,
        progress: ProgressFn | None = None,
    ) -> PipelineResult:
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        refuse_own_output(files[0])
        series = assemble_series(files)
        if series.hu.shape[0] < self.min_time_points:
            raise NotCTPError(
                f"{series.hu.shape[0]} time points: a CT perfusion series needs at least {self.min_time_points}"
            )
        seconds["assemble"] = time.perf_counter() - started

        mark = time.perf_counter()
        grid = to_model_grid(series)
        seconds["to_grid"] = time.perf_counter() - mark

        mark = time.perf_counter()
        results = self.engine.inpaint_many(grid.slabs, series.times_s, usable=usable, progress=progress)
        seconds["inpaint"] = time.perf_counter() - mark
        first = results[0]
        for other in results[1:]:  # the plan depends on the times only, so all slabs agree
            if not np.array_equal(other.synthetic, first.synthetic):
                raise RuntimeError("slabs were planned differently; this is a bug, please report it")

        mark = time.perf_counter()
        back = back_to_source(
            grid, [r.sequence for r in results], first.synthetic, series, first.times_s, usable=usable
        )
        hu_1s, fills = back.hu, back.fills
        seconds["from_grid"] = time.perf_counter() - mark

        mark = time.perf_counter()
        sources = back.sources
        verdict = check_series(hu_1s, sources, series.hu, series.times_s, grid.brain_mask, self.guardrail)
        recipe, synthetic = self.recipe, first.synthetic
        if not verdict.passed:
            log.warning("series %s: guardrail %s", series.series_uid, verdict.summary())
            recipe = dataclasses.replace(recipe, comment=verdict.comment())
        if verdict.action == "fallback":
            fall_back(hu_1s, sources, series.hu)
            fills = None  # the counts described the replaced seconds
            synthetic = np.zeros_like(first.synthetic)
            reason = "the model's output failed the guardrail check"
            if first.fallback.any():
                reason += "; or gap longer than the model's"
            recipe = dataclasses.replace(recipe, interpolation_reason=reason)
        seconds["guardrail"] = time.perf_counter() - mark

        mark = time.perf_counter()
        derived = write_derived_series(
            hu_1s, first.times_s, synthetic, series, list(files), out_dir, recipe=recipe, usable=usable, fills=fills
        )
        verdict.write(out_dir)
        seconds["write"] = time.perf_counter() - mark
        seconds["total"] = time.perf_counter() - started
        replaced = first.synthetic & ~synthetic  # model seconds the guardrail's fallback interpolated
        return PipelineResult(
            derived=derived, times_s=first.times_s, synthetic=synthetic, interpolated=first.fallback | replaced,
            notes=list(first.plan.notes), seconds=seconds, guardrail=verdict,
        )  # fmt: skip


def refuse_own_output(path: Path) -> None:
    """A series this node wrote (routed back to it by a PACS rule) is not inpainted again."""
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer", "ImageType"])
    if str(header.get("Manufacturer", "")) == DERIVED_MANUFACTURER and "DERIVED" in list(header.get("ImageType", [])):
        raise NotCTPError("the series is ctp-node's own synthetic output (Manufacturer ctp-node, DERIVED)")


def recipe_for(
    model: ModelSettings, output: OutputSettings, checkpoint: Path, sampling: SamplingChoice | None = None
) -> DerivedRecipe:
    sampling = sampling or choose_sampling(model.sampler, model.steps)
    return DerivedRecipe(
        model_name=MODEL_NAME[:64],
        model_version=f"ctp-node {__version__}",
        checkpoint_id=checkpoint_id(Path(checkpoint)),
        sampler=sampling.sampler,
        steps=sampling.steps,
        series_number_offset=output.series_number_offset,
        series_description=output.series_description,
    )


def make_processor(pipeline: SeriesPipeline) -> Callable[[SeriesJob, Sequence[Path], Path], object]:
    """The worker's processor: run the pipeline on the spooled files of a job."""
    from ctp_node.node.worker import ProcessOutput

    def process(job: SeriesJob, files: Sequence[Path], out_dir: Path) -> ProcessOutput:
        if not files:
            raise NotCTPError(f"series {job.series_uid} has no spooled instances")
        # A worker has no terminal: inpainting progress goes to the log (every 10 s or 10 %).
        progress = ProgressLog(log.info, f"series {job.series_uid} inpainting", steps=pipeline.engine.settings.steps)
        result = pipeline.run(files, out_dir, progress=progress)
        log.info(
            "series %s: %d instances written (%d synthetic seconds) in %.1f s %s",
            job.series_uid, result.derived.count, int(result.synthetic.sum()), result.seconds["total"],
            {k: round(v, 2) for k, v in result.seconds.items()},
        )  # fmt: skip
        verdict = result.guardrail
        return ProcessOutput(out_dir, result.derived.count, verdict.summary() if verdict else None)

    return process
