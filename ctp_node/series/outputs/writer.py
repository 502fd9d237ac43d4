"""``write_perfusion_outputs``: one job's perfusion outputs, each its own series in its own folder.

Per analysis (the synthetic 1 s series; the acquired series alone when given and switched on): the
four quantitative maps, the four colour maps, the SR with the volumes, the SEG with the masks. Once per
job: the QA report (PNG in ``png_dir``, and a Secondary Capture). What is written is switched by
``PerfusionOutputSettings`` (``[perfusion_outputs]``). SeriesNumbers: the reference series' number
(i.e. the derived series') + ``series_number_offset`` + a fixed index per output, so a PACS lists them
in the same order for every study.

Everything is checked before the first file is written; an output that cannot be made (e.g. a SEG
for a reference series highdicom refuses) raises ``PerfusionOutputError`` naming it, after the outputs
before it were written.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from ctp_node.config import PerfusionOutputSettings
from ctp_node.errors import PerfusionOutputError
from ctp_node.permissions import make_dirs
from ctp_node.series.outputs.colour import write_colour_series
from ctp_node.series.outputs.common import OutputSeries, identity, read_references, tracking_uid
from ctp_node.series.outputs.inputs import MAP_NAMES, PerfusionAnalysis, PerfusionOutputInput
from ctp_node.series.outputs.qa_report import write_qa_report
from ctp_node.series.outputs.quantitative import write_map_series
from ctp_node.series.outputs.report_sr import write_structured_report
from ctp_node.series.outputs.segmentation import write_segmentation
from ctp_node.series.outputs.styles import MAP_STYLES

log = logging.getLogger(__name__)
OUTPUTS_FOLDER = "perfusion"
# Index of each output within an analysis' block of 20 series numbers (synthetic 0-19, acquired 20-39).
INDEX = {("map", "cbf"): 1, ("map", "cbv"): 2, ("map", "mtt"): 3, ("map", "tmax"): 4,
         ("colour_map", "cbf"): 5, ("colour_map", "cbv"): 6, ("colour_map", "mtt"): 7, ("colour_map", "tmax"): 8,
         ("sr", "volumes"): 9, ("seg", "lesions"): 10}  # fmt: skip
BLOCK = 20
QA_INDEX = 0


def write_perfusion_outputs(
    data: PerfusionOutputInput,
    out_dir: Path,
    settings: PerfusionOutputSettings | None = None,
    *,
    png_dir: Path | None = None,
    seconds: dict[str, float] | None = None,
) -> list[OutputSeries]:
    """Write the switched-on outputs of ``data`` under ``out_dir`` (one sub-folder per series) and return them.

    ``png_dir``: where the QA report's PNG goes (default ``out_dir``); ``seconds``: filled with the time
    per output kind, for the job's timing log."""
    cfg = settings or PerfusionOutputSettings()
    timing = seconds if seconds is not None else {}
    if not cfg.enabled:
        return []
    analyses = [data.synthetic] + ([data.acquired] if data.acquired is not None and cfg.from_acquired else [])
    for analysis in analyses:
        analysis.check()
    if data.acquired is not None and data.acquired.shape != data.synthetic.shape:
        raise PerfusionOutputError(
            f"the acquired analysis' maps are {data.acquired.shape}, the synthetic {data.synthetic.shape}: "
            "both must be on the reference images' grid"
        )
    if not data.source_series_uid:
        raise PerfusionOutputError("source_series_uid is empty: the output UIDs hang on the job's source series")
    mark = time.perf_counter()
    headers = read_references(data.reference_files, data.synthetic.shape)
    needs_pixels = cfg.segmentation
    full = read_references(data.reference_files, data.synthetic.shape, pixels=True) if needs_pixels else headers
    timing["read_references"] = time.perf_counter() - mark
    base = int(headers[0].get("SeriesNumber") or 0) + cfg.series_number_offset
    make_dirs(out_dir)
    written: list[OutputSeries] = []

    def ident(kind: str, analysis: PerfusionAnalysis | None, name: str, text: str, index: int):
        which = "both" if analysis is None else analysis.kind.value
        block = 0 if analysis is None or analysis is data.synthetic else BLOCK
        return identity(data.source_series_uid, data.generation, kind, which, name, base + block + index, text)

    def tracker(analysis: PerfusionAnalysis):
        # Seeded by the label (the kind's display text), as the tracking UIDs always were: same UIDs.
        return functools.partial(tracking_uid, data.source_series_uid, data.generation, analysis.label)

    def timed(key: str, write, *args, **kwargs):
        start = time.perf_counter()
        result = write(*args, **kwargs)
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
        return result

    for analysis in analyses:
        short = analysis.kind.short
        for name in MAP_NAMES:
            style = MAP_STYLES[name]
            if cfg.quantitative_maps:
                text = f"{style.title} {style.unit.replace(' ', '')} {short}"
                written.append(timed(
                    "maps", write_map_series, analysis, style, headers,
                    ident("map", analysis, name, text, INDEX["map", name]), out_dir,
                    source_series_uid=data.source_series_uid, reference_is_source=analysis is data.synthetic,
                ))  # fmt: skip
            if cfg.colour_maps:
                text = f"{style.title} colour {short}"
                written.append(timed(
                    "colour_maps", write_colour_series, analysis, style, headers,
                    ident("colour_map", analysis, name, text, INDEX["colour_map", name]), out_dir,
                ))  # fmt: skip
        if cfg.structured_report:
            written.append(timed(
                "sr", write_structured_report, analysis, headers,
                ident("sr", analysis, "volumes", f"CTP volumes SR {short}", INDEX["sr", "volumes"]), out_dir,
                tracker(analysis),
            ))  # fmt: skip
        if cfg.segmentation:
            seg = timed(
                "seg", _segmentation, analysis, full,
                ident("seg", analysis, "lesions", f"CTP lesions SEG {short}", INDEX["seg", "lesions"]), out_dir,
                tracker(analysis),
            )  # fmt: skip
            if seg is None:
                log.warning("perfusion output %s seg: not written, every lesion volume is withheld", analysis.label)
            else:
                written.append(seg)
    if cfg.qa_report:
        report_data = data if cfg.from_acquired else _without_acquired(data)
        qa_ident = ident("qa_report", None, "qa", "CTP QA report", QA_INDEX)
        series, png = timed("qa_report", write_qa_report, report_data, headers, qa_ident, out_dir, png_dir or out_dir)
        written.append(series)
        log.info("perfusion QA report: %s", png)
    for series in written:
        for note in series.notes:
            # Notes describe the series (padding, clipping, invalid share); a job warning is for faults.
            log.info("perfusion output %s %s %s: %s", series.analysis, series.kind, series.name, note)
    return written


def _segmentation(analysis: PerfusionAnalysis, full, ident, out_dir: Path, tracking) -> OutputSeries | None:
    try:
        return write_segmentation(analysis, full, ident, out_dir, tracking)
    except (ValueError, TypeError) as exc:
        raise PerfusionOutputError(f"the SEG of the {analysis.label} analysis cannot be made: {exc}") from exc


def _without_acquired(data: PerfusionOutputInput) -> PerfusionOutputInput:
    from dataclasses import replace

    return replace(data, acquired=None, acquired_curves=None)
