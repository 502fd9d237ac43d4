"""`ctp-node demo`: the main job end to end on one machine, with embedded defaults.

A stand-in site PACS (a pynetdicom storage SCP writing to ``<out>/pacs``) and the node (receiver
and one worker) start on free loopback ports; a phantom study sampled every 4 s is sent to the node
with C-STORE; the node completes, inpaints and sends the synthetic 1 s series to the PACS; then
perfusion maps of the acquired and of the synthetic series are compared with the phantom's truth.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ctp_node.config import Settings
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.dicom_status import STATUS_SUCCESS
from ctp_node.node.shared.jobs import JobStore, State
from ctp_node.node.shared.peer import Peer
from ctp_node.node.shared.spool import SeriesKey, check_uid
from ctp_node.node.work.scu import send_files
from ctp_node.node.work.series_processor import make_processor
from ctp_node.node.work.worker import Worker
from ctp_node.series.outputs.qa_report import PNG_NAME as QA_REPORT_PNG
from ctp_node.series.pipeline import SeriesPipeline

log = logging.getLogger(__name__)
Say = Callable[[str], None]


@dataclass
class DemoResult:
    pacs_dir: Path
    derived_series_uid: str
    derived_files: int
    figures: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo_pacs(folder: Path, port: int, ae_title: str = "DEMOPACS"):
    """A minimal storage SCP standing in for the site PACS: files land in ``folder/<series UID>/``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        series = folder / check_uid(ds.SeriesInstanceUID, "SeriesInstanceUID")
        series.mkdir(exist_ok=True)
        ds.save_as(series / f"{check_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm", enforce_file_format=True)
        return STATUS_SUCCESS

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def demo_settings(
    out: Path, checkpoint: Path, pacs_port: int, steps: int | None = None, sampler: str | None = None
) -> Settings:
    """The demo node's settings; sampler and steps left unset take the checkpoint's recommendation."""
    model = {"checkpoint": str(checkpoint), "long_gap": "linear"}
    model |= {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
    return Settings(
        dicom={"ae_title": "CTPNODE", "bind_address": "127.0.0.1", "port": _free_port()},
        series={"quiet_period_s": 2.0},
        storage={"data_dir": str((out / "node").resolve())},
        model=model,
        destinations=[{"name": "demo-pacs", "host": "127.0.0.1", "port": pacs_port, "ae_title": "DEMOPACS"}],
        send={"initial_backoff_s": 1.0, "max_backoff_s": 5.0},
    )


def run_demo(
    out: Path,
    checkpoint: Path,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    matrix: int = 128,
    say: Say = print,
    progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    out.mkdir(parents=True, exist_ok=True)
    pacs_port = _free_port()
    pacs = start_demo_pacs(out / "pacs", pacs_port)
    settings = demo_settings(out, checkpoint, pacs_port, steps, sampler)
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    receiver.start()
    stop = threading.Event()
    watcher = threading.Thread(target=receiver.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        say(
            f"node {settings.dicom.ae_title} listening on 127.0.0.1:{settings.dicom.port}; demo PACS DEMOPACS on "
            f"127.0.0.1:{pacs_port} -> {out / 'pacs'}"
        )
        study = generate_phantom(
            PhantomConfig(matrix=matrix, slices=8, duration_s=61, noise_hu=6.0, lesion=True, seed=7)
        )
        acquired = sample_study(study, parse_schedule("every:4"))
        files = write_study(acquired, out / "scanner", layout="single-frame", uid_seed="ctp-node demo")
        say(f"phantom study: {len(acquired.times_s)} volumes every 4 s, {len(files)} instances; sending with C-STORE")
        results = send_files(files, Peer("127.0.0.1", settings.dicom.port, "CTPNODE"), "DEMOSCANNER")
        if not all(r.ok for r in results):
            raise RuntimeError("the node refused instances of the demo study; see the log")
        job = _wait(lambda: next(iter(store.read.jobs([State.QUEUED])), None), 60, "the series to complete")
        say(f"series complete after the {settings.series.quiet_period_s:g} s quiet period: job {job.id}; inpainting")
        processor = make_processor(SeriesPipeline.from_settings(settings), progress=progress)
        Worker(settings, store, processor, worker_id="demo").run_once()
        done = store.get(job.id)
        if done.state != State.DONE:
            raise RuntimeError(f"the demo series ended {done.state.value}: {done.error}")
        if done.guardrail:
            say(f"guardrail: {done.guardrail}")
        # The result folder's top level holds the synthetic series; perfusion/ holds the other outputs.
        first = next(Path(done.result_dir).glob("*.dcm"))
        derived_uid = str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)
        derived_dir = out / "pacs" / derived_uid
        derived_files = sorted(derived_dir.glob("*.dcm"))
        say(f"synthetic 1 s series {derived_dir.name}: {len(derived_files)} instances landed in {derived_dir}")
        others = [p for p in (out / "pacs").iterdir() if p.is_dir() and p != derived_dir]
        report = Path(done.result_dir) / QA_REPORT_PNG
        say(
            f"perfusion outputs: {len(others)} more series in the demo PACS (maps, colour maps, SR, SEG, QA report)"
            + (f"; QA report {report}" if report.is_file() else "")
        )
        spool_files = receiver.spool.instances(SeriesKey(job.study_uid, job.series_uid))
        result = DemoResult(pacs_dir=derived_dir, derived_series_uid=derived_dir.name, derived_files=len(derived_files))
        result.summary, result.figures = _compare_perfusion(study, spool_files, derived_files, out, say)
        (out / "summary.json").write_text(json.dumps(result.summary, indent=2))
        return result
    finally:
        stop.set()
        watcher.join()
        receiver.stop()
        pacs.shutdown()


def _wait(fetch, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fetch()
        if value is not None:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


# What the comparison's numbers are (summary.json's "about"; the console says it in one line).
ABOUT = (
    "Perfusion maps (parametric deconvolution) of the acquired series (every 4 s) and of the node's synthetic "
    "1 s series, each against the phantom's true maps. Per map and tissue (grey, white matter): the median over "
    "the tissue's voxels of the absolute error (in the map's unit, see units), of the relative error "
    "|map - truth| / truth for CBF, CBV and MTT (0.1 = 10 %), and of the signed error (bias). Tmax has no "
    "relative error: true delays near 0 s in normal tissue make any ratio meaningless; its errors are in "
    "seconds. core and hypoperfusion: Dice overlap (1 = the same voxels) and volumes of the core (rCBF < 30 %) "
    "and Tmax > 6 s regions against those the same conventions give on the true maps. One phantom study at "
    "one noise level: it shows that the node runs end to end, it does not measure the model (ctp-node "
    "evaluate does, over many studies). comparison says in words where the synthetic series' maps are "
    "closer to the truth than the acquired series' and where they are further."
)
UNITS = {"cbf": "mL/100 g/min", "cbv": "mL/100 g", "mtt": "s", "tmax": "s", "volumes": "mL"}
# Which error each map is compared by: relative for the flows and volumes, absolute seconds for Tmax.
COMPARED_BY = {"cbf": "median_rel_error", "cbv": "median_rel_error", "mtt": "median_rel_error",
               "tmax": "median_abs_error"}  # fmt: skip
# A difference smaller than this is "about the same": 10 % of the error and 2 points (0.2 s for Tmax).
SAME_RATIO, SAME_REL, SAME_S = 1.1, 0.02, 0.2
TISSUES = {"grey": "grey matter", "white": "white matter"}


def analysis_summary(agreement) -> dict:
    """One analysis' agreement with the truth for summary.json: Tmax without a relative error."""
    out = agreement.to_dict()
    for region in out["maps"]["tmax"].values():
        region.pop("median_rel_error", None)
    return out


def _error_text(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} s" if COMPARED_BY[name] == "median_abs_error" else f"{value:.0%}"


def _closer(synthetic: float | None, acquired: float | None, name: str) -> str | None:
    """Whether the synthetic error is "closer" to the truth than the acquired, "further" or the "same";
    None when either is unknown."""
    if synthetic is None or acquired is None:
        return None
    floor = SAME_S if COMPARED_BY[name] == "median_abs_error" else SAME_REL
    if synthetic > acquired * SAME_RATIO and synthetic - acquired > floor:
        return "further"
    if acquired > synthetic * SAME_RATIO and acquired - synthetic > floor:
        return "closer"
    return "same"


def compare_in_words(summary: dict) -> list[str]:
    """Sentences saying where the synthetic series' maps are closer to the truth than the acquired
    series' and where further (``summary``: {"acquired": ..., "synthetic": ...} as analysis_summary gives)."""
    acquired, synthetic = summary["acquired"], summary["synthetic"]
    sentences = []
    worse_anywhere = False
    for region, tissue in TISSUES.items():
        groups: dict[str, list[str]] = {"further": [], "closer": [], "same": []}
        for name, metric in COMPARED_BY.items():
            syn = synthetic["maps"][name].get(region, {}).get(metric)
            acq = acquired["maps"][name].get(region, {}).get(metric)
            verdict = _closer(syn, acq, name)
            if verdict is not None:
                groups[verdict].append(f"{name.upper() if name != 'tmax' else 'Tmax'} "
                                       f"({_error_text(name, syn)} vs {_error_text(name, acq)})")  # fmt: skip
        parts = []
        if groups["further"]:
            worse_anywhere = True
            parts.append("further from the truth than the acquired series' for " + ", ".join(groups["further"]))
        if groups["closer"]:
            parts.append("closer for " + ", ".join(groups["closer"]))
        if groups["same"]:
            parts.append("about the same for " + ", ".join(groups["same"]))
        if parts:
            sentences.append(f"{tissue}: the synthetic series' maps are " + "; ".join(parts) + " (median error).")
    for key, title in (("core", "core (rCBF < 30 %)"), ("hypoperfusion", "Tmax > 6 s")):
        syn, acq = (synthetic.get(key) or {}).get("dice"), (acquired.get(key) or {}).get("dice")
        if syn is not None and acq is not None:
            word = "better than" if syn > acq + 0.05 else "worse than" if syn < acq - 0.05 else "about the same as"
            sentences.append(
                f"{title}: overlap with the true region (Dice) {syn:.2f}, {word} the acquired series' {acq:.2f}."
            )
    if worse_anywhere:
        sentences.append(
            "Where the synthetic series is further from the truth, the model's seconds add error rather than "
            "recover what 4 s sampling loses: on this study its maps there are not better than the acquired series'."
        )
    return sentences


def _compare_perfusion(study, acquired_files, derived_files, out: Path, say: Say) -> tuple[dict, list[Path]]:
    """Maps of the acquired (4 s) and synthetic (1 s) series against the phantom's truth."""
    from ctp_node.evaluation.metrics import ReferenceMaps, perfusion_agreement
    from ctp_node.perfusion import PerfusionSettings, compute_perfusion
    from ctp_node.perfusion.figure import save_figure
    from ctp_node.phantom import TissueLabel
    from ctp_node.series.assemble import assemble_series

    truth = study.truth
    reference = ReferenceMaps.by_convention(truth.cbf, truth.cbv, truth.mtt, truth.tmax, truth.parenchyma_mask)
    regions = {"grey": truth.labels == TissueLabel.GREY_MATTER, "white": truth.labels == TissueLabel.WHITE_MATTER}
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    summary, figures = {}, []
    for name, files in (("acquired every 4 s", acquired_files), ("synthetic 1 s", derived_files)):
        series = assemble_series(files)
        settings = PerfusionSettings(pixel_mm=float(series.spacing_mm[2]))
        maps = compute_perfusion(series.hu, series.times_s, voxel_ml, method="parametric", settings=settings)
        agreement = perfusion_agreement(maps, reference, regions, voxel_ml)
        key = name.split()[0]
        summary[key] = analysis_summary(agreement)
        figure = save_figure(
            out / f"perfusion_{key}.png", series.hu, maps, title=f"{name} (phantom, research use only)"
        )
        figures.append(figure)
        grey = {m: summary[key]["maps"][m]["grey"].get(COMPARED_BY[m]) for m in COMPARED_BY}
        say(
            f"{name:>20}: median error in grey matter CBF {_error_text('cbf', grey['cbf'])}, CBV "
            f"{_error_text('cbv', grey['cbv'])}, MTT {_error_text('mtt', grey['mtt'])}, Tmax "
            f"{_error_text('tmax', grey['tmax'])}; Dice core {agreement.core.dice:.2f}, Tmax > 6 s "
            f"{agreement.hypoperfusion.dice:.2f} -> {figure}"
        )
    say(
        "(errors against the phantom's true maps: median |map - truth| / truth, Tmax in seconds; Dice 1 = the "
        "true region; one phantom study, not a measure of the model: summary.json says more)"
    )
    comparison = compare_in_words(summary)
    for sentence in comparison:
        say(sentence)
    summary = {"about": ABOUT, "units": UNITS, **summary, "comparison": comparison}
    return summary, figures
