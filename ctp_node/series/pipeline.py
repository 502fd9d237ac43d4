"""The path of one series, as plain functions over plain data (docs/architecture.md):

    assemble -> to_model_grid -> inpaint (all 8-slice slabs of the study) -> back_to_source -> guardrail -> write

``run_series`` is the one function that runs it; the worker (``ctp_node.node.processing``),
``ctp-node process``/``reprocess``, ``ctp-node demo``, ``ctp-node evaluate`` and the benchmarks
call it. What fills each second is planned once per study by the engine (``model.planner.FillPlan``)
and read by every later stage.
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
from ctp_node.series import CTPSeries
from ctp_node.series.assemble import assemble_series
from ctp_node.series.derived import NODE_MANUFACTURER as DERIVED_MANUFACTURER
from ctp_node.series.derived import DerivedRecipe, DerivedSeries, write_derived_series
from ctp_node.series.grid import back_to_source, to_model_grid
from ctp_node.series.guardrail import GuardrailVerdict, check_series, fall_back
from model import EngineSettings, FillPlan, Inpainter, load_denoiser
from model.engine import SamplingChoice, StudyInpainter, choose_sampling

log = logging.getLogger(__name__)
MODEL_NAME = "CTP temporal inpainting diffusion (Bae et al. MICCAI 2024)"

ProgressFn = Callable[[int, int], None]


@dataclass
class SeriesResult:
    """One series after the pipeline: what fills each second, the 1 s series in HU, and what was written.

    ``fill``: the engine's plan as sent (after the guardrail: a fallback makes the model's seconds
    ``interpolated``), with the source-grid stage's voxel counts. ``hu``: float32 (T1, Z, Y, X) HU as
    written (or as it would be). ``derived``: None when the pipeline was asked not to write.
    """

    fill: FillPlan
    hu: np.ndarray
    brain_mask: np.ndarray  # (Z, Y, X) bool: the node's skull-stripped mask (what the model may change)
    derived: DerivedSeries | None = None
    guardrail: GuardrailVerdict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def times_s(self) -> np.ndarray:
        """(T1,) the grid seconds, on the clock of the source's times."""
        return self.fill.times_s

    @property
    def synthetic(self) -> np.ndarray:
        """(T1,) bool: seconds sent as the model's output."""
        return self.fill.synthetic

    @property
    def interpolated(self) -> np.ndarray:
        """(T1,) bool: seconds interpolated (long-gap policy, or the guardrail's fallback)."""
        return self.fill.interpolated


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


@dataclass
class SeriesPipeline:
    """What ``run_series`` runs with: an engine (the loaded model, or ``model.LinearInpainter``), the
    output recipe (None: the pipeline cannot write), the guardrail's settings and the series' minimum
    length. Build with ``from_settings`` for a node."""

    engine: StudyInpainter
    recipe: DerivedRecipe | None = None
    min_time_points: int = 3
    guardrail: GuardrailSettings = field(default_factory=GuardrailSettings)
    # How the engine's sampler and steps were chosen (given, the checkpoint's, the default).
    sampling: SamplingChoice | None = None

    def __post_init__(self) -> None:
        settings = getattr(self.engine, "settings", None)
        if self.sampling is None and isinstance(settings, EngineSettings):
            self.sampling = SamplingChoice(settings.sampler, settings.steps, "given")

    @property
    def steps(self) -> int:
        """Network evaluations per target (for progress displays; 1 for an engine without a network)."""
        settings = getattr(self.engine, "settings", None)
        return settings.steps if isinstance(settings, EngineSettings) else 1

    @classmethod
    def from_settings(cls, settings: Settings, device: str | None = None) -> SeriesPipeline:
        model = settings.model
        checkpoint = model.checkpoint or default_checkpoint()
        loaded = load_denoiser(checkpoint)
        # Configured sampler/steps win; what they leave open comes from the checkpoint, else the default.
        sampling = choose_sampling(model.sampler, model.steps, loaded.info.recommended)
        log.info("sampler %s", sampling.describe())
        engine = Inpainter(loaded, engine_settings(model, sampling), device=device or model.device)
        recipe = recipe_for(model, settings.output, checkpoint, sampling)
        return cls(engine, recipe, settings.series.min_time_points, settings.guardrail, sampling)


def run_series(
    pipeline: SeriesPipeline,
    source: Sequence[Path] | CTPSeries,
    out_dir: Path | None = None,
    *,
    usable: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> SeriesResult:
    """Run one series through assemble -> grid -> inpaint -> back -> guardrail -> write.

    ``source``: the series' DICOM files (assembled here; the node's own output is refused), or an
    already assembled ``CTPSeries``. ``out_dir``: where the derived series and the guardrail's verdict
    go; None runs every stage but writing and returns the arrays (evaluation). ``usable``: (T,) False
    for source volumes to treat as missing. ``progress(done, total)``: the engine's volume-steps.
    """
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    files: list[Path] = []
    if isinstance(source, CTPSeries):
        series = source
        if series.header is not None:
            refuse_own_output(series.header)
    else:
        files = [Path(p) for p in source]
        series = assemble_series(files, check_first_header=refuse_own_output)
    if series.hu.shape[0] < pipeline.min_time_points:
        raise NotCTPError(
            f"{series.hu.shape[0]} time points: a CT perfusion series needs at least {pipeline.min_time_points}"
        )
    seconds["assemble"] = time.perf_counter() - started

    mark = time.perf_counter()
    grid = to_model_grid(series)
    seconds["to_grid"] = time.perf_counter() - mark

    mark = time.perf_counter()
    study = pipeline.engine.inpaint_study(grid.slabs, series.times_s, usable=usable, progress=progress)
    seconds["inpaint"] = time.perf_counter() - mark

    mark = time.perf_counter()
    back = back_to_source(grid, study.sequences, study.fill, series)
    hu_1s, fill = back.hu, back.fill
    seconds["from_grid"] = time.perf_counter() - mark

    mark = time.perf_counter()
    verdict = check_series(hu_1s, fill, series.hu, series.times_s, grid.brain_mask, pipeline.guardrail)
    recipe = pipeline.recipe
    if not verdict.passed:
        log.warning("series %s: guardrail %s", series.series_uid, verdict.summary())
        recipe = dataclasses.replace(recipe, comment=verdict.comment()) if recipe else None
    if verdict.action == "fallback":
        had_long_gaps = fill.fallback.any()
        fill = fall_back(hu_1s, fill, series.hu)
        reason = "the model's output failed the guardrail check"
        if had_long_gaps:
            reason += "; or gap longer than the model's"
        recipe = dataclasses.replace(recipe, interpolation_reason=reason) if recipe else None
    seconds["guardrail"] = time.perf_counter() - mark

    derived = None
    if out_dir is not None:
        if recipe is None:
            raise ValueError("the pipeline has no output recipe: give SeriesPipeline a DerivedRecipe to write")
        mark = time.perf_counter()
        derived = write_derived_series(hu_1s, fill, series, files, out_dir, recipe=recipe)
        verdict.write(out_dir)
        seconds["write"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    return SeriesResult(
        fill=fill, hu=hu_1s, brain_mask=grid.brain_mask, derived=derived, guardrail=verdict,
        notes=list(study.fill.notes), seconds=seconds,
    )  # fmt: skip


def refuse_own_output(header) -> None:
    """A series this node wrote (routed back to it by a PACS rule) is not inpainted again.
    ``header``: a pydicom dataset of one of the series' instances."""
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
