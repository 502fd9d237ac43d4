"""`ctp-node serve` (receiver) and `ctp-node worker` (one per GPU, or `--send-only`: delivery alone)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import typer
from rich.markup import escape

from ctp_node.cli.common import CONFIG_OPTION, load_settings_or_exit
from ctp_node.cli.progress import stderr
from ctp_node.config import Settings, open_files_warning
from ctp_node.errors import ConfigError

LOG_LEVEL = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR.")
LOG_FORMAT = typer.Option("text", "--log-format", help="text, or json (one JSON object per line).")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(
    config: Path | None = CONFIG_OPTION,
    workers: int = typer.Option(
        0,
        "--workers",
        help="Worker processes to start beside the receiver (one per GPU); 0: start `ctp-node worker` yourself.",
    ),
    worker_devices: str | None = typer.Option(
        None, "--worker-devices", help="Devices of those workers, e.g. cuda:0,cuda:1 (default: the model.device)."
    ),
    log_level: str = LOG_LEVEL,
    log_format: str = LOG_FORMAT,
) -> None:
    """Receive CTP series (C-STORE), spool them, queue each series once it has been quiet."""
    from ctp_node.logs import setup_logging
    from ctp_node.node.receive.receiver import Receiver
    from ctp_node.node.shared.jobs import JobStore

    setup_logging(log_level, log_format)
    settings = load_settings_or_exit(config)
    too_few = open_files_warning(settings, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if too_few:
        stderr.print(f"[yellow]warning:[/yellow] {too_few}")
    # --worker-devices names one device per worker; otherwise --workers workers on model.device.
    devices: list[str | None] = list(worker_devices.split(",")) if worker_devices else [None] * workers
    try:
        store = JobStore(settings.database_url)
        receiver = Receiver(settings, store)
    except ConfigError as exc:  # e.g. storage.object_store: a bucket that does not exist, refused credentials
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    except OSError as exc:  # not permitted, a file where a folder should be, a read-only disk
        stderr.print(
            f"[red]error:[/red] cannot write the node's data under {settings.storage.data_dir}: {exc}. Run as the "
            "user that owns it, or set storage.data_dir (e.g. CTP_NODE_STORAGE__DATA_DIR=$HOME/ctp-node-data)."
        )
        raise typer.Exit(2) from exc
    receiver.metrics.serve(settings.metrics)
    web = None
    if settings.web.enabled:  # the status page (ctp_node/web), in a thread of this process
        from ctp_node.web import start_web

        try:
            web = start_web(settings, store, receiver)
        except (OSError, ValueError, RuntimeError) as exc:
            stderr.print(f"[red]error:[/red] status page on {settings.web.bind_address}:{settings.web.port}: {exc}")
            raise typer.Exit(2) from exc
    stop = _stop_on_signals()
    try:
        receiver.start()
    except OSError as exc:
        stderr.print(f"[red]error:[/red] cannot listen on {settings.dicom.bind_address}:{settings.dicom.port}: {exc}")
        raise typer.Exit(2) from exc
    children = []
    for index, device in enumerate(devices):
        command = [sys.executable, "-m", "ctp_node", "worker", "--log-level", log_level, "--log-format", log_format]
        if config:
            command += ["--config", str(config)]
        if device:
            command += ["--device", device]
        if settings.metrics.port is not None:  # each worker next to the receiver's port
            command += ["--metrics-port", str(settings.metrics.port + 1 + index)]
        children.append(subprocess.Popen(command))
    stderr.print(
        f"ctp-node receiving as {settings.dicom.ae_title} on {settings.dicom.bind_address}:{settings.dicom.port}, "
        f"data in {settings.storage.data_dir}, {len(children)} worker process(es); Ctrl-C stops"
    )
    try:
        receiver.watch(stop)
    finally:
        receiver.stop()
        if web is not None:
            web.stop()
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=60)


def worker(
    config: Path | None = CONFIG_OPTION,
    device: str | None = typer.Option(None, "--device", help="cuda:N, cpu or auto (default: model.device)."),
    once: bool = typer.Option(False, "--once", help="Run what is runnable now, then exit."),
    send_only: bool = typer.Option(
        False,
        "--send-only",
        help="Only deliver results that wait to be sent (no model, no GPU): e.g. after a destination was down.",
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Serve this worker's Prometheus metrics (processing, sending) on this port."
    ),
    log_level: str = LOG_LEVEL,
    log_format: str = LOG_FORMAT,
) -> None:
    """Claim series jobs, inpaint them on this device and deliver the results (one process per GPU)."""
    from ctp_node.logs import setup_logging
    from ctp_node.node.shared.jobs import JobStore
    from ctp_node.node.work.series_processor import make_processor
    from ctp_node.node.work.worker import Worker
    from ctp_node.series.pipeline import SeriesPipeline

    setup_logging(log_level, log_format)
    settings = load_settings_or_exit(config)
    if send_only:
        if device is not None:
            raise typer.BadParameter("--device is for processing; --send-only loads no model")
        _send_only(settings, once, metrics_port)
        return
    try:
        pipeline = SeriesPipeline.from_settings(settings, device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    store = JobStore(settings.database_url)
    try:
        node_worker = Worker(settings, store, make_processor(pipeline))
    except ConfigError as exc:  # e.g. storage.object_store: a bucket that does not exist, refused credentials
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    node_worker.metrics.describe_worker(node_worker.worker_id, str(pipeline.engine.device))
    if metrics_port is not None:
        node_worker.metrics.serve(settings.metrics.model_copy(update={"port": metrics_port}))
    stderr.print(f"worker {node_worker.worker_id} on {pipeline.engine.device}, model {pipeline.recipe.checkpoint_id}")
    try:
        if once:
            while node_worker.run_once() is not None:
                pass
        else:
            node_worker.run_forever(_stop_on_signals())
    finally:
        node_worker.close()  # webhooks that are due go out before the process ends


def _send_only(settings: Settings, once: bool, metrics_port: int | None) -> None:
    """The send stage on its own: deliver every result that waits to be sent (state ``sending``), with
    the worker's retry policy and the same per-destination sending; nothing is processed."""
    from ctp_node.node.shared.jobs import JobStore
    from ctp_node.node.work.send_stage import SendStage
    from ctp_node.node.work.worker import run_stage

    store = JobStore(settings.database_url)
    try:
        stage = SendStage(settings, store)
    except ConfigError as exc:
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    if metrics_port is not None:
        stage.metrics.serve(settings.metrics.model_copy(update={"port": metrics_port}))
    destinations = ", ".join(stage.destinations) or "none configured"
    stderr.print(f"send stage {stage.worker_id}: delivering waiting results to {destinations}")
    try:
        if once:  # what is due now; a delivery waiting for its next attempt stays for a later run
            while stage.run_once() is not None:
                pass
        else:
            run_stage(stage.run_once, _stop_on_signals(), 1.0, settings.jobs.error_backoff_max_s)
    finally:
        stage.notifier.close()  # webhooks that are due go out before the process ends
