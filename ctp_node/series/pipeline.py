"""The path of one series, as plain functions over plain data (docs/architecture.md):

    assemble -> motion -> to_model_grid -> inpaint (all 8-slice slabs of the study) -> from_model_grid
    -> guardrail -> write (synthetic 1 s series) -> perfusion outputs (maps, SR, SEG, QA report)

``run_series`` is the one function that runs it; the worker (``ctp_node.node.work.series_processor``),
``ctp-node process``/``reprocess``, ``ctp-node demo``, ``ctp-node evaluate`` and the benchmarks
call it. What fills each second is planned once per study by the engine (``model.planner.FillPlan``)
and read by every later stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctp_node import __version__
from ctp_node.config import (
    GuardrailSettings,
    ModelSettings,
    MotionSettings,
    OutputSettings,
    PerfusionOutputSettings,
    Settings,
)
from ctp_node.errors import MotionError, NotCTPError, PerfusionError, PerfusionOutputError
from ctp_node.files import is_disk_full, write_json
from ctp_node.series import CTPSeries
from ctp_node.series.assemble import DEFAULT_MAX_MATRIX, assemble_series
from ctp_node.series.derived import DerivedRecipe, DerivedSeries, write_derived_series
from ctp_node.series.grid import from_model_grid, to_model_grid
from ctp_node.series.guardrail import VOLUME_CHECKS, GuardrailVerdict, check_series, check_volumes, fall_back
from ctp_node.series.motion import MOTION_FILE, MotionResult, correct_motion
from ctp_node.series.node_dicom import NODE_MANUFACTURER
from ctp_node.series.outputs import AnalysisKind, OutputSeries
from ctp_node.series.outputs.writer import OUTPUTS_FOLDER
from model import EngineSettings, FillPlan, Inpainter, load_denoiser
from model.engine import SamplingChoice, StudyInpainter, choose_sampling

VOLUMES_FILE = "volumes.json"  # per job: the lesion volumes reported or withheld, and why
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
    motion: MotionResult | None = None  # None: the motion stage was off or could not run (see notes)
    outputs: list[OutputSeries] = field(default_factory=list)  # the perfusion output series written
    # What the job states besides the guardrail (also in ``notes``): outputs asked for but not made.
    warnings: list[str] = field(default_factory=list)

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
    motion: MotionSettings | None = None  # None: no motion stage
    perfusion_outputs: PerfusionOutputSettings | None = None  # None: no perfusion outputs
    max_matrix: int = DEFAULT_MAX_MATRIX  # [series] max_matrix: larger images are refused at assembly

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
        return cls(
            engine, recipe, settings.series.min_time_points, settings.guardrail, sampling,
            motion=settings.motion, perfusion_outputs=settings.perfusion_outputs,
            max_matrix=settings.series.max_matrix,
        )  # fmt: skip


def run_series(
    pipeline: SeriesPipeline,
    source: Sequence[Path] | CTPSeries,
    out_dir: Path | None = None,
    *,
    usable: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> SeriesResult:
    """Run one series through assemble -> motion -> grid -> inpaint -> back -> guardrail -> write ->
    perfusion outputs.

    ``source``: the series' DICOM files (assembled here; the node's own output is refused), or an
    already assembled ``CTPSeries``. ``out_dir``: where the derived series and the guardrail's verdict
    go; None runs every stage but writing and returns the arrays (evaluation). ``usable``: (T,) False
    for source volumes to treat as missing (the motion stage adds the volumes it cannot rescue).
    ``progress(done, total)``: the engine's volume-steps.
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
        series = assemble_series(files, check_first_header=refuse_own_output, max_matrix=pipeline.max_matrix)
    if series.hu.shape[0] < pipeline.min_time_points:
        raise NotCTPError(
            f"{series.hu.shape[0]} time points: a CT perfusion series needs at least {pipeline.min_time_points}"
        )
    seconds["assemble"] = time.perf_counter() - started
    notes: list[str] = []

    motion = None
    if pipeline.motion is not None and pipeline.motion.enabled:
        mark = time.perf_counter()
        motion, series, usable = _motion_stage(series, pipeline.motion, usable, notes)
        seconds["motion"] = time.perf_counter() - mark

    mark = time.perf_counter()
    grid = to_model_grid(series)
    seconds["to_model_grid"] = time.perf_counter() - mark

    mark = time.perf_counter()
    study = pipeline.engine.inpaint_study(grid.slabs, series.times_s, usable=usable, progress=progress)
    seconds["inpaint"] = time.perf_counter() - mark

    mark = time.perf_counter()
    back = from_model_grid(grid, study.sequences, study.fill, series)
    hu_1s, fill = back.hu, back.fill
    seconds["from_model_grid"] = time.perf_counter() - mark

    mark = time.perf_counter()
    verdict = check_series(hu_1s, fill, series.hu, series.times_s, grid.brain_mask, pipeline.guardrail)
    recipe = pipeline.recipe
    if motion is not None and recipe is not None and (motion.corrected.any() or not motion.usable.all()):
        recipe = dataclasses.replace(recipe, comment=_joined(recipe.comment, motion.comment()))
    if not verdict.passed:
        log.warning("series %s: guardrail %s", series.series_uid, verdict.summary())
        recipe = dataclasses.replace(recipe, comment=_joined(recipe.comment, verdict.comment())) if recipe else None
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
        derived = write_derived_series(
            hu_1s, fill, series, files, out_dir, recipe=recipe, volume_notes=_volume_notes(motion)
        )
        verdict.write(out_dir)
        if motion is not None:
            write_json(out_dir / MOTION_FILE, motion.summary())
        seconds["write"] = time.perf_counter() - mark

    outputs: list[OutputSeries] = []
    warnings: list[str] = list(series.warnings)  # what assembly accepted but the job must state
    cfg = pipeline.perfusion_outputs
    if derived is not None and cfg is not None and cfg.enabled:
        mark = time.perf_counter()
        outputs = _perfusion_outputs(
            series, hu_1s, fill, derived, verdict, recipe, cfg, out_dir, seconds, notes,
            pipeline.guardrail.volume_jump_ml, warnings=warnings,
        )  # fmt: skip
        seconds["perfusion_outputs"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    return SeriesResult(
        fill=fill, hu=hu_1s, brain_mask=grid.brain_mask, derived=derived, guardrail=verdict,
        notes=list(study.fill.notes) + notes, seconds=seconds, motion=motion, outputs=outputs, warnings=warnings,
    )  # fmt: skip


def _volume_notes(motion: MotionResult | None) -> dict[int, str]:
    """Per source volume, what the motion stage did to it (for the images it fills or that replace it)."""
    if motion is None:
        return {}
    notes = {}
    for volume in motion.volumes:
        if not volume.usable:
            notes[volume.volume] = "; ".join(volume.reasons)
        elif volume.corrected:
            notes[volume.volume] = (
                f"realigned to the baseline by rigid registration (it had moved {volume.displacement_mm:.1f} mm)"
            )
    return notes


def _joined(*comments: str) -> str:
    return " ".join(c for c in comments if c)


def _motion_stage(
    series: CTPSeries, settings: MotionSettings, usable: np.ndarray | None, notes: list[str]
) -> tuple[MotionResult | None, CTPSeries, np.ndarray | None]:
    """Realign the volumes; the ones registration cannot rescue join ``usable``'s unusable ones.
    A series the check cannot run on (too short, no skull in the slab) goes on unchecked, with a note."""
    try:
        motion = correct_motion(series, settings)
    except MotionError as exc:
        notes.append(f"motion not checked: {exc}")
        log.warning("series %s: motion not checked: %s", series.series_uid, exc)
        return None, series, usable
    combined = motion.usable if usable is None else (np.asarray(usable, dtype=bool) & motion.usable)
    if motion.corrected.any() or not motion.usable.all():
        log.info("series %s: %s", series.series_uid, motion.comment())
        notes.append(motion.comment())
    return motion, motion.series, combined


def _perfusion_outputs(
    series: CTPSeries,
    hu_1s: np.ndarray,
    fill: FillPlan,
    derived: DerivedSeries,
    verdict: GuardrailVerdict,
    recipe: DerivedRecipe | None,
    cfg: PerfusionOutputSettings,
    out_dir: Path,
    seconds: dict[str, float],
    notes: list[str],
    volume_jump_ml: float = 0.0,
    *,
    warnings: list[str] | None = None,
) -> list[OutputSeries]:
    """Maps, volumes (SR), masks (SEG) and the QA report of the synthetic 1 s series (and of the acquired
    series alone, for comparison). A series perfusion analysis refuses (e.g. no arterial input) still
    sends its synthetic series: the refusal is logged and noted, not a failed job. So does a series whose
    outputs fail to be written: none of them is sent (the folder is removed), the failure goes to
    ``warnings`` (the job states it) with its traceback in the log."""
    from ctp_node.perfusion import PerfusionSettings, compute_perfusion
    from ctp_node.series.outputs import output_input, write_perfusion_outputs

    voxel_ml = float(np.prod(series.spacing_mm)) / 1000.0
    analysis = PerfusionSettings(
        pixel_mm=float(series.spacing_mm[2]),  # the noise filter works in mm
        mirror_limit_ml=cfg.mirror_limit_ml, tmax_max_interval_s=cfg.tmax_max_interval_s,
        core_max_interval_s=cfg.core_max_interval_s, noise_limit_ml=cfg.noise_limit_ml,
    )  # fmt: skip
    acquired_times = series.times_s[np.asarray(fill.input_second) >= 0]  # the volumes the seconds rest on
    try:
        maps = compute_perfusion(hu_1s, fill.times_s, voxel_ml, settings=analysis, acquired_times_s=acquired_times)
        acquired = (
            compute_perfusion(series.hu, series.times_s, voxel_ml, settings=analysis) if cfg.from_acquired else None
        )
        if acquired is not None:
            _check_volumes(maps, acquired, verdict, volume_jump_ml, out_dir)
        for kind, result in ((AnalysisKind.SYNTHETIC, maps), (AnalysisKind.ACQUIRED, acquired)):
            notes.extend(f"{kind.value}: {line}" for line in _withheld_lines(result))
            if result is not None and result.validity is not None:
                notes.append(f"{kind.value}: {result.validity.note(result.tissue_mask)}")
        write_json(out_dir / VOLUMES_FILE, volumes_record(maps, acquired))
        data = output_input(
            maps, hu_1s, derived.paths[: series.hu.shape[1]], series.series_uid, voxel_volume_ml=voxel_ml,
            acquired_maps=acquired, acquired_hu=series.hu if acquired is not None else None, guardrail=verdict,
            generation=recipe.generation if recipe is not None else 1, synthetic_times_s=fill.times_s,
            acquired_times_s=series.times_s,
        )  # fmt: skip
        return write_perfusion_outputs(data, out_dir / OUTPUTS_FOLDER, cfg, png_dir=out_dir, seconds=seconds)
    except (PerfusionError, PerfusionOutputError) as exc:
        notes.append(f"perfusion outputs not made: {exc}")
        if warnings is not None:
            warnings.append(notes[-1])
        log.warning("series %s: perfusion outputs not made: %s", series.series_uid, exc)
        return []
    except Exception as exc:
        if is_disk_full(exc):  # not the series' fault: the attempt fails and is retried whole, outputs and all
            raise
        # A writer that fails (a bug, a value highdicom refuses) used to fail the whole job, which was
        # then inpainted again on every retry (issue 23); the synthetic series is the result that matters.
        shutil.rmtree(out_dir / OUTPUTS_FOLDER, ignore_errors=True)  # no half-written output series is sent
        notes.append(f"perfusion outputs not made: {type(exc).__name__}: {exc}")
        if warnings is not None:
            warnings.append(notes[-1])
        log.error("series %s: %s", series.series_uid, notes[-1], exc_info=exc)
        return []


def _check_volumes(maps, acquired, verdict: GuardrailVerdict, tolerance: float, out_dir: Path) -> None:
    """The guardrail's volume check (synthetic vs acquired alone); a jump withholds the synthetic volume."""
    checks = check_volumes(
        {"core": maps.core_volume_ml, "tmax6": maps.hypoperfusion_volume_ml},
        {"core": acquired.core_volume_ml, "tmax6": acquired.hypoperfusion_volume_ml},
        tolerance, acquired.withheld,
    )  # fmt: skip
    verdict.add(checks)
    for key, check in zip(VOLUME_CHECKS, checks):
        if not check.passed:
            apart = f"{check.value:+.1f} mL apart (tolerance {check.tolerance:g} mL)"
            maps.withhold(key, f"guardrail: {check.detail}, {apart}")
    if checks:
        verdict.write(out_dir)


def volumes_record(synthetic, acquired) -> dict:
    """``volumes.json`` of a job: per analysis and lesion volume, the number reported or why it is withheld
    (what the SR says), and the measured value (for whoever audits a withheld one)."""
    record = {}
    for kind, maps in ((AnalysisKind.SYNTHETIC, synthetic), (AnalysisKind.ACQUIRED, acquired)):
        if maps is None:
            continue
        label = kind.label  # the record's keys: "synthetic 1 s", "acquired"
        record[label] = {
            "acquired_interval_s": maps.acquired_interval_s,
            "volumes": {name: check.summary() for name, check in maps.volume_checks.items()},
            "mismatch_ratio": maps.mismatch_ratio,
        }
        if getattr(maps, "validity", None) is not None:
            # Per map, the share of the analysed tissue without a value the data support, and why.
            record[label]["validity"] = maps.validity.summary(maps.tissue_mask)
    return record


def _withheld_lines(maps) -> list[str]:
    if maps is None:
        return []
    return [f"{name} volume withheld: {reason}" for name, reason in maps.withheld.items()]


def refuse_own_output(header) -> None:
    """A series this node wrote (routed back to it by a PACS rule) is not inpainted again.
    ``header``: a pydicom dataset of one of the series' instances."""
    if str(header.get("Manufacturer", "")) == NODE_MANUFACTURER and "DERIVED" in list(header.get("ImageType", [])):
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
