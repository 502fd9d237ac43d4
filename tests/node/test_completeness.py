"""Series completeness: header facts per instance, the verdict, and when the job store queues a series."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Column, MetaData, Table, UniqueConstraint, create_engine, inspect, text

from ctp_node.node.shared.completeness import CompletionPolicy, InstanceFacts, facts_from_header, judge, read_facts
from ctp_node.node.shared.job_tables import series_table
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from tests.node.dicom_helpers import ct_instance, require, run
from tests.ports import free_port

POLICY = CompletionPolicy(60, complete_quiet_period_s=10, incomplete_wait_s=600, min_time_points=3)


def facts(positions: int = 4, time_points: int = 3, skip: set[tuple[int, int]] = frozenset(), prefix: str = "1.9"):
    """Facts of a single-frame CTP series: AcquisitionNumber per volume, InstanceNumber global."""
    return [
        InstanceFacts(f"{prefix}.{t}.{z}", position=f"0.00\\0.00\\{5.0 * z:.2f}", time_key=f"a{t + 1}",
                      instance_number=t * positions + z + 1)
        for t in range(time_points) for z in range(positions) if (t, z) not in skip
    ]  # fmt: skip


def rows(instances):
    return [(f.position, f.time_key, f.frames) for f in instances]


# --- the verdict -------------------------------------------------------------------------------------
def test_equal_counts_per_position_look_complete():
    verdict = judge(rows(facts()))
    assert verdict.kind == "complete" and "3 time points x 4 slice positions" in verdict.reason


def test_a_position_short_of_instances_is_incomplete():
    verdict = judge(rows(facts(skip={(2, 1), (2, 3)})))  # the last volume lacks two slices
    assert verdict.kind == "incomplete"
    assert "4 slice positions holding 2 to 3 instances each (2 positions hold fewer than 3)" in verdict.reason


def test_a_time_point_with_missing_slices_is_incomplete_even_when_positions_balance():
    # Every position holds 3 instances, but volume 2 holds 3 of the 4 slices and volume 3 five: one
    # slice of volume 2 is missing (and volume 3 holds one it should not).
    series = facts()
    series[5] = InstanceFacts(series[5].sop_uid, series[5].position, "a3")
    verdict = judge(rows(series))
    assert verdict.kind == "incomplete"
    assert "2 time points do not hold one instance per slice position (time point 2: 3 of 4)" in verdict.reason


def test_a_missing_volume_between_others_is_incomplete():
    series = [f for f in facts(time_points=5) if f.time_key != "a3"]  # volume 3 never arrived
    verdict = judge(rows(series))
    assert verdict.kind == "incomplete" and "time points 3 missing" in verdict.reason


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        (None, "complete"),  # no time key at all: positions decide
        ("a1", "complete"),  # one AcquisitionNumber for the whole series (Siemens-like): not a volume key
        ("per-slice", "complete"),  # a number per slice: not a volume key either
    ],
)
def test_time_keys_that_do_not_name_volumes_are_ignored(keys, kind):
    series = facts()
    if keys == "per-slice":
        series = [InstanceFacts(f.sop_uid, f.position, f"a{i}") for i, f in enumerate(series)]
    else:
        series = [InstanceFacts(f.sop_uid, f.position, keys) for f in series]
    assert judge(rows(series)).kind == kind


def test_what_the_headers_do_not_say_is_unknown():
    assert judge([]).kind == "unknown"
    assert judge([(None, "a1", None)] * 6).kind == "unknown"  # no positions
    assert judge(rows(facts(time_points=2))).kind == "unknown"  # fewer than min_time_points volumes so far
    assert judge(rows(facts(time_points=2)), min_time_points=2).kind == "complete"


def test_enhanced_ct_counts_frames_per_instance():
    assert judge([(None, None, 48)] * 5).kind == "complete"
    short = judge([(None, None, 48)] * 4 + [(None, None, 30)])
    assert short.kind == "incomplete" and "1 with 30 frames, 4 with 48 frames" in short.reason


# --- header facts -------------------------------------------------------------------------------------
def test_facts_are_read_from_the_header_without_the_pixel_data(tmp_path):
    path = tmp_path / "a.dcm"
    ds = ct_instance(path, study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5")
    ds.ImagePositionPatient = [-120.0, -0.004, 37.5]
    ds.AcquisitionNumber, ds.InstanceNumber = 7, 31
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 400])  # a file cut inside its pixel data still has its header
    for p in (path, truncated):
        assert read_facts(p, "1.2.3.4.5") == InstanceFacts("1.2.3.4.5", "-120.00\\0.00\\37.50", "a7", 31)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert read_facts(tmp_path / "junk.dcm", "9.9") == InstanceFacts("9.9")
    assert read_facts(tmp_path / "absent.dcm", "9.9") == InstanceFacts("9.9")


def test_temporal_position_wins_and_nonsense_values_are_dropped():
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.TemporalPositionIdentifier, ds.AcquisitionNumber, ds.InstanceNumber = 4, 1, 2**40
    ds.ImagePositionPatient = [1e300, 0, 0]
    assert facts_from_header("1.2", ds) == InstanceFacts("1.2", None, "t4", None)
    enhanced = pydicom.Dataset()
    enhanced.SOPClassUID, enhanced.NumberOfFrames = "1.2.840.10008.5.1.4.1.1.2.1", 96
    assert facts_from_header("1.3", enhanced) == InstanceFacts("1.3", frames=96)


# --- the job store ---------------------------------------------------------------------------------------
@pytest.fixture()
def store(database_url):  # noqa: F811
    return JobStore(database_url)


def _received(store, series: str, instances, ago_s: float):
    store.record_instance("1.2.3", series, "SCANNER", at=utcnow() - timedelta(seconds=ago_s), instances=instances)
    return store.find(series)


def test_a_complete_series_is_queued_after_the_short_quiet_period(store):
    job = _received(store, "1.2.3.1", facts(), ago_s=15)
    assert store.queue_quiet_series(POLICY) == [job.id]
    assert store.get(job.id).state == State.QUEUED and store.get(job.id).warning is None


def test_an_incomplete_series_waits_then_is_queued_with_a_warning(store):
    job = _received(store, "1.2.3.2", facts(skip={(2, 0)}), ago_s=15)
    now = utcnow()
    assert store.queue_quiet_series(POLICY, now=now) == []
    assert store.queue_quiet_series(POLICY, now=now + timedelta(seconds=300)) == []  # quiet period long past
    assert store.get(job.id).state == State.RECEIVING
    assert store.queue_quiet_series(POLICY, now=now + timedelta(seconds=600)) == [job.id]
    queued = store.get(job.id)
    assert queued.state == State.QUEUED
    assert queued.warning.startswith("queued incomplete after 600 s without a new instance")
    assert "positions hold fewer than 3" in queued.warning
    # the missing instance arrives late: re-opened, the warning goes, and it is judged complete again
    store.record_instance("1.2.3", "1.2.3.2", "SCANNER", instances=facts()[8:9])
    reopened = store.get(job.id)
    assert reopened.state == State.RECEIVING and reopened.warning is None and reopened.instances == 12
    assert store.completeness(job.id).kind == "complete"


def test_a_series_the_headers_say_nothing_about_waits_the_quiet_period(store):
    job = _received(store, "1.2.3.3", [InstanceFacts(f"1.8.{i}") for i in range(12)], ago_s=15)
    assert store.queue_quiet_series(POLICY) == []
    assert store.queue_quiet_series(POLICY, now=utcnow() + timedelta(seconds=50)) == [job.id]


def test_a_reopened_series_is_not_queued_early(store):
    job = _received(store, "1.2.3.4", facts(), ago_s=120)
    store.queue_quiet_series(POLICY)
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=15), instances=facts()[:1])
    assert store.get(job.id).generation == 2
    assert store.queue_quiet_series(POLICY) == []  # a late arrival: more may come
    assert store.queue_quiet_series(POLICY, now=utcnow() + timedelta(seconds=50)) == [job.id]


def test_instances_are_counted_by_sop_instance_uid(store):
    series = facts(positions=8, time_points=21)  # 168 instances
    store.record_instance("1.2.3", "1.2.3.5", "SCANNER", instances=series[:100])
    store.record_instance("1.2.3", "1.2.3.5", "SCANNER", instances=series[100:])
    store.record_instance("1.2.3", "1.2.3.5", "SCANNER", instances=series[7:8] * 2)  # a resend, twice in a batch
    assert store.find("1.2.3.5").instances == 168


def test_a_store_from_an_older_version_opens_and_gains_the_new_parts(database_url):  # noqa: F811
    url = database_url
    old = MetaData()
    Table(
        "series",
        old,
        *[Column(c.name, c.type, primary_key=c.primary_key) for c in series_table.c if c.name != "warning"],
        UniqueConstraint("study_uid", "series_uid", name="uq_series_uid"),  # every version had it (4cad241 on)
    )
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO series (study_uid, series_uid, state, generation, instances, calling_ae, "
                "first_received_at, last_received_at, attempts, updated_at) VALUES "
                "('1.2.3', '1.2.3.4', 'done', 1, 168, 'S', '2026-01-01', '2026-01-01', 0, '2026-01-01')"
            )
        )
    engine.dispose()
    store = JobStore(url)
    assert {"warning"} <= {c["name"] for c in inspect(store.engine).get_columns("series")}
    assert inspect(store.engine).has_table("instances")
    old_job = store.find("1.2.3.4")
    assert old_job.instances == 168 and old_job.warning is None
    store.record_instance("1.2.3", "1.2.3.9", "S", instances=facts())
    assert store.find("1.2.3.9").instances == 12
    JobStore(url)  # and again: nothing left to add


def test_recovery_backfills_the_facts_of_a_series_received_by_an_older_version(tmp_path):
    from ctp_node.node.receive.receiver import recover_spool
    from ctp_node.node.shared.spool import SeriesKey, Spool

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    spool = Spool(tmp_path / "spool")
    key = SeriesKey("1.2.3", "1.2.3.4")
    for i in range(4):
        path = tmp_path / f"{i}.dcm"
        ds = ct_instance(path, study=key.study_uid, series=key.series_uid, sop=f"1.2.3.4.{i}")
        ds.ImagePositionPatient = [0, 0, 5 * (i % 2)]
        ds.save_as(path, enforce_file_format=True)
        spool.write(key, ds.SOPInstanceUID, path.read_bytes())
    store.record_instance(key.study_uid, key.series_uid, "S", at=utcnow() + timedelta(seconds=5), count=4)  # old way
    job = store.find(key.series_uid)
    assert store.instance_rows(job.id) == 0
    assert recover_spool(spool, store) == 0  # nothing re-opened or registered...
    assert store.instance_rows(job.id) == 4 and store.find(key.series_uid).state == State.RECEIVING  # ...facts known
    assert store.completeness(job.id, min_time_points=2).kind == "complete"


def test_a_late_instance_of_a_series_counted_by_an_older_version_keeps_the_count_right(tmp_path):
    from ctp_node.node.receive.ingest import ReceivedInstance
    from ctp_node.node.receive.receiver import InstanceRecorder
    from ctp_node.node.shared.audit import AuditLog
    from ctp_node.node.shared.prometheus import NodeMetrics
    from ctp_node.node.shared.spool import SeriesKey, Spool

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    spool, key = Spool(tmp_path / "spool"), SeriesKey("1.2.3", "1.2.3.4")
    paths = [spool.write(key, f"1.2.3.4.{i}", b"x") for i in range(5)]
    store.record_instance(key.study_uid, key.series_uid, "S", count=4)  # the old way, before the upgrade
    store.queue_quiet_series(0)
    recorder = InstanceRecorder(store, AuditLog(tmp_path / "audit.jsonl"), NodeMetrics())
    late = ReceivedInstance(key, "1.2.3.4.4", "1.2", paths[4], "S", "h", "CT", utcnow())
    recorder.submit(late)
    recorder.submit(late)  # and its resend
    recorder.flush()
    recorder.stop()
    job = store.find(key.series_uid)
    assert job.instances == 5 and job.generation == 2


# --- the real receiver ---------------------------------------------------------------------------------------
def _series_files(folder, study, series, positions, time_points, skip=()):
    files = []
    for t in range(time_points):
        for z in range(positions):
            if (t, z) in skip:
                continue
            path = folder / f"{series[-6:]}_{t}_{z}.dcm"
            ds = ct_instance(path, study=study, series=series, sop=f"{series}.{t + 1}.{z + 1}")
            ds.ImagePositionPatient, ds.AcquisitionNumber = [0, 0, 5.0 * z], t + 1
            ds.InstanceNumber = t * positions + z + 1
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def test_the_receiver_queues_complete_series_early_and_holds_incomplete_ones(tmp_path):
    from ctp_node.config import Settings
    from ctp_node.node.receive.receiver import Receiver

    storescu = require("storescu")
    settings = Settings(
        dicom={"ae_title": "CTPNODE", "bind_address": "127.0.0.1", "port": free_port()},
        series={"quiet_period_s": 4, "complete_quiet_period_s": 0.5, "incomplete_wait_s": 8},
        storage={"data_dir": str(tmp_path / "node")},
    )
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    receiver.start()
    stop = threading.Event()
    watcher = threading.Thread(target=receiver.watch, args=(stop,), daemon=True)
    watcher.start()
    study = generate_uid()
    complete, incomplete = generate_uid(prefix=None), generate_uid(prefix=None)  # room for .t.z below
    files = _series_files(tmp_path, study, complete, 4, 3)
    # the resend of one instance must not count twice
    files += _series_files(tmp_path, study, incomplete, 4, 3, skip={(2, 1), (2, 2)}) + files[:1]
    try:
        sent = run(
            storescu, "-aet", "SCANNER", "-aec", "CTPNODE", "127.0.0.1", str(settings.dicom.port), *map(str, files)
        )
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 30

        # job rows are written by the receiver's batching thread, a moment after the acknowledgement
        def waiting() -> bool:
            job = store.find(incomplete)
            return job is None or job.state == State.RECEIVING

        while time.monotonic() < deadline and waiting():
            time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
        receiver.stop()
    early, late = store.find(complete), store.find(incomplete)
    assert early.instances == 12 and late.instances == 10
    assert early.state == late.state == State.QUEUED
    with store.engine.connect() as conn:
        waited = {
            r.series_uid: (r.queued_at - r.last_received_at).total_seconds()
            for r in conn.execute(series_table.select())
        }
    assert waited[complete] < 4  # before the quiet period
    assert waited[incomplete] >= 8  # held for the rest, well past the quiet period
    assert early.warning is None and "10 instances at 4 slice positions" in late.warning
