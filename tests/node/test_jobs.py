from datetime import timedelta

import pytest

from ctp_node.node.shared.jobs import JobStore, LeaseLost, State, utcnow


@pytest.fixture()
def store(database_url):
    return JobStore(database_url)


def received(store, series="1.2.3.4", n=3, at=None):
    for _ in range(n):
        store.record_instance("1.2.3", series, "SCANNER", at=at)
    return store.find(series)


def test_series_lifecycle_to_done(store):
    t0 = utcnow() - timedelta(seconds=120)
    job = received(store, at=t0)
    assert job.state == State.RECEIVING and job.instances == 3 and job.generation == 1
    assert store.queue_quiet_series(60) == [job.id]
    assert store.find("1.2.3.4").state == State.QUEUED
    claimed = store.claim("w1", lease_s=60)
    assert claimed.id == job.id and claimed.state == State.PROCESSING and claimed.lease_owner == "w1"
    assert store.claim("w2", lease_s=60) is None  # leased
    assert store.processed(job.id, "w1", 1, "/results/x", 1.5, ["pacs", "archive"])
    assert store.find("1.2.3.4").state == State.SENDING
    deliveries = store.pending_deliveries(job.id)
    assert [d.destination for d in deliveries] == ["pacs", "archive"]
    for d in deliveries:
        store.delivery_sent(d.id, 100)
    assert store.finish_sending(job.id, "w1") == State.DONE
    done = store.find("1.2.3.4")
    assert done.state == State.DONE and done.lease_owner is None and done.result_dir == "/results/x"


def test_quiet_period_is_respected(store):
    received(store)
    assert store.queue_quiet_series(60) == []
    assert store.find("1.2.3.4").state == State.RECEIVING


def test_late_instance_reopens_and_stale_result_is_not_delivered(store):
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER")  # late instance while processing
    reopened = store.find("1.2.3.4")
    assert reopened.state == State.RECEIVING and reopened.generation == 2
    assert store.processed(job.id, "w1", 1, "/results/old", 1.0, ["pacs"]) is False
    assert store.pending_deliveries(job.id) == []
    # after a done result, a late instance re-opens again
    store.queue_quiet_series(0)
    claimed = store.claim("w1", lease_s=60)
    assert claimed.generation == 2
    assert store.processed(job.id, "w1", 2, "/results/new", 1.0, [])
    assert store.find("1.2.3.4").state == State.DONE
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER")
    assert store.find("1.2.3.4").generation == 3 and store.find("1.2.3.4").state == State.RECEIVING


def test_expired_lease_is_taken_over(store):
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    later = utcnow() + timedelta(seconds=61)
    taken = store.claim("w2", lease_s=60, now=later)
    assert taken.id == job.id and taken.lease_owner == "w2" and taken.attempts == 2
    with pytest.raises(LeaseLost):
        store.heartbeat(job.id, "w1", 60)
    with pytest.raises(LeaseLost):
        store.processed(job.id, "w1", 1, "/r", 1.0, [])
    # A failure recorded late by the worker that lost the lease changes nothing, and says so.
    assert store.failed(job.id, "w1", "late failure", retry_at=later) is False
    assert store.get(job.id).lease_owner == "w2" and store.get(job.id).error in (None, "")
    store.heartbeat(job.id, "w2", 60)
    assert store.failed(job.id, "w2", "its own failure", retry_at=later) is True


def test_sending_retries_then_fails_with_the_reason(store):
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    store.processed(job.id, "w1", 1, "/r", 1.0, ["pacs"])
    (delivery,) = store.pending_deliveries(job.id)
    retry_at = utcnow() + timedelta(seconds=30)
    store.delivery_failed(delivery.id, "connection refused", retry_at)
    assert store.finish_sending(job.id, "w1") == State.SENDING
    waiting = store.find("1.2.3.4")
    assert waiting.next_attempt_at == retry_at and waiting.lease_owner is None
    assert store.claim("w1", lease_s=60) is None  # not due yet
    again = store.claim("w1", lease_s=60, now=retry_at + timedelta(seconds=1))
    assert again.state == State.SENDING  # resumes sending, does not recompute
    store.delivery_failed(delivery.id, "connection refused", None)
    assert store.finish_sending(job.id, "w1") == State.FAILED
    failed = store.find("1.2.3.4")
    assert "pacs: connection refused" in failed.error
    store.resend(job.id, ["pacs"])
    assert store.find("1.2.3.4").state == State.SENDING
    assert [d.state for d in store.pending_deliveries(job.id)] == ["pending"]


def test_confirmed_files_are_kept_per_delivery_until_delivered_a_new_result_or_a_resend(store):
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    store.processed(job.id, "w1", 1, "/r/g1", 1.0, ["pacs", "archive"])
    pacs, archive = store.pending_deliveries(job.id)
    store.confirm_files(pacs.id, ["0.dcm", "sub/1.dcm"])
    store.confirm_files(pacs.id, ["0.dcm", "2.dcm", "2.dcm"])  # repeats are ignored
    store.delivery_failed(pacs.id, "1 of 4 instances refused (no response)", utcnow())
    assert store.confirmed_files(pacs.id) == {"0.dcm", "sub/1.dcm", "2.dcm"}
    assert store.confirmed_files(archive.id) == set()
    store.resend(job.id, ["archive"])
    assert store.confirmed_files(pacs.id) == {"0.dcm", "sub/1.dcm", "2.dcm"}, "only a resent destination starts afresh"
    store.resend(job.id, ["pacs"])
    assert store.confirmed_files(pacs.id) == set()
    store.confirm_files(pacs.id, ["0.dcm"])
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER")  # a late instance: generation 2, a new result
    store.queue_quiet_series(0)
    claimed = store.claim("w1", lease_s=60, now=utcnow() + timedelta(seconds=120))
    assert store.processed(job.id, claimed.lease_owner, 2, "/r/g2", 1.0, ["pacs"])
    assert store.confirmed_files(pacs.id) == set()
    store.confirm_files(pacs.id, ["0.dcm"])
    store.delivery_sent(pacs.id, 4)  # delivered: the confirmations are not needed any more
    assert store.confirmed_files(pacs.id) == set()


def test_processing_failure_retry_ignore_and_manual_retry(store):
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    store.failed(job.id, "w1", "GPU out of memory", retry_at=utcnow() + timedelta(seconds=5))
    assert store.find("1.2.3.4").state == State.QUEUED
    store.claim("w1", lease_s=60, now=utcnow() + timedelta(seconds=6))
    store.failed(job.id, "w1", "not a CT perfusion series: one time point", ignored=True)
    ignored = store.find("1.2.3.4")
    assert ignored.state == State.IGNORED and "one time point" in ignored.error
    store.retry(job.id)
    assert store.find("1.2.3.4").state == State.QUEUED and store.find("1.2.3.4").error is None
    with pytest.raises(ValueError, match="no result"):
        store.resend(job.id, ["pacs"])


def test_counts_and_listing(store):
    received(store, "1.2.3.4")
    received(store, "1.2.3.5", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    counts = store.read.counts()
    assert counts["receiving"] == 1 and counts["queued"] == 1 and counts["done"] == 0
    assert [j.series_uid for j in store.read.jobs([State.QUEUED])] == ["1.2.3.5"]
    assert len(store.read.jobs()) == 2


def test_concurrent_claimers_never_take_the_same_job(database_url):
    """Eight threads on four stores (connection pools) race for 40 jobs: each is claimed exactly once."""
    import threading

    stores = [JobStore(database_url) for _ in range(4)]
    for i in range(40):
        stores[0].record_instance("1.2.3", f"1.2.3.{i}", "S", at=utcnow() - timedelta(seconds=120))
    stores[0].queue_quiet_series(60)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(store, name):
        while (job := store.claim(name, lease_s=60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(stores[i % 4], f"w{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40


def test_two_receivers_starting_the_same_series_at_once_make_one_job(postgres):
    """Receivers on two hosts share one database: both see no row for a new series, both insert it.
    Held deterministic: host A's insert stays uncommitted while host B records the same series (B's
    insert waits on the unique key); after A commits, B must join A's series, not fail its C-STORE."""
    import threading

    from sqlalchemy import create_engine

    from ctp_node.node.shared.completeness import InstanceFacts
    from ctp_node.node.shared.job_tables import metadata, series_table

    engine = create_engine(postgres.url)
    metadata.drop_all(engine)
    host_b = JobStore(postgres.url)  # creates the tables
    now = utcnow()
    errors: list[BaseException] = []
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(series_table.insert().values(
            study_uid="1.2.3", series_uid="1.2.3.9", state=State.RECEIVING.value, generation=1, instances=0,
            calling_ae="HOST_A", first_received_at=now, last_received_at=now, attempts=0, updated_at=now,
        ))  # fmt: skip

        def record_on_b():
            try:
                facts = [InstanceFacts("1.2.3.9.1")]
                host_b.record_instance("1.2.3", "1.2.3.9", "HOST_B", instances=facts)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

        thread = threading.Thread(target=record_on_b)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive()  # B waits on A's uncommitted key
        transaction.commit()
    thread.join(timeout=30.0)
    assert not thread.is_alive() and errors == []
    with engine.connect() as conn:
        series = conn.execute(series_table.select().where(series_table.c.series_uid == "1.2.3.9")).all()
    assert len(series) == 1 and series[0].instances == 1 and host_b.find("1.2.3.9").state == State.RECEIVING
    engine.dispose()


def test_two_receivers_recording_one_series_at_once_keep_its_count(postgres):
    """Two receivers record instances of the same series at the same moment (a barrier before each):
    the series' count must be the number of its instance rows. Without the row lock each counted the
    rows it could see and the later UPDATE kept a stale count (found by tests/multihost; here 137 of
    200 series were wrong before the fix)."""
    import threading

    from sqlalchemy import create_engine

    from ctp_node.node.shared.completeness import InstanceFacts
    from ctp_node.node.shared.job_tables import metadata

    engine = create_engine(postgres.url)
    metadata.drop_all(engine)
    engine.dispose()
    stores = [JobStore(postgres.url), JobStore(postgres.url)]
    n_series = 40
    for i in range(n_series):
        stores[0].record_instance("1.2.3", f"1.2.3.{i}", "S", instances=[InstanceFacts(f"1.2.3.{i}.0")])
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def receiver(index: int) -> None:
        try:
            for i in range(n_series):
                barrier.wait()
                stores[index].record_instance(
                    "1.2.3", f"1.2.3.{i}", "S", instances=[InstanceFacts(f"1.2.3.{i}.{index + 1}")]
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=receiver, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    wrong = [i for i in range(n_series) if stores[0].find(f"1.2.3.{i}").instances != 3]
    assert wrong == [], f"{len(wrong)} of {n_series} series lost count of an instance"


def test_recover_spool_registers_and_reopens(tmp_path):
    import os
    import time as _time

    from ctp_node.node.receive.receiver import recover_spool
    from ctp_node.node.shared.spool import SeriesKey, Spool

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    spool = Spool(tmp_path / "spool")
    known, unknown = SeriesKey("1.2.3", "1.2.3.4"), SeriesKey("1.2.3", "1.2.3.5")
    spool.write(known, "1.2.3.4.1", b"a")
    store.record_instance(known.study_uid, known.series_uid, "S")
    store.queue_quiet_series(0)
    store.claim("w", 60)
    store.processed(store.find(known.series_uid).id, "w", 1, "/r", 1.0, [])  # done
    for i in range(3):
        spool.write(unknown, f"1.2.3.5.{i}", b"b")
    late = spool.write(known, "1.2.3.4.2", b"c")  # received, but the crash lost its database row
    future = _time.time() + 5
    os.utime(late, (future, future))
    (late.parent / ".x.part").write_bytes(b"half")
    assert recover_spool(spool, store) == 2
    assert store.find(unknown.series_uid).instances == 3
    reopened = store.find(known.series_uid)
    assert reopened.state == State.RECEIVING and reopened.generation == 2 and reopened.instances == 2
    assert not (late.parent / ".x.part").exists()
    assert recover_spool(spool, store) == 0  # idempotent


def test_instance_recorder_batches_and_survives_a_database_hiccup(tmp_path):
    from ctp_node.node.receive.ingest import ReceivedInstance
    from ctp_node.node.receive.receiver import InstanceRecorder
    from ctp_node.node.shared.audit import AuditLog
    from ctp_node.node.shared.prometheus import NodeMetrics
    from ctp_node.node.shared.spool import SeriesKey

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    real = store.record_instance
    failures = []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    store.record_instance = flaky
    audit = AuditLog(tmp_path / "audit.jsonl")
    recorder = InstanceRecorder(store, audit, NodeMetrics())
    key = SeriesKey("1.2.3", "1.2.3.4")
    for i in range(50):
        recorder.submit(
            ReceivedInstance(
                key,
                f"1.2.3.4.{i}",
                "1.2.840.10008.5.1.4.1.1.2",
                tmp_path / f"{i}.dcm",
                "SCANNER",
                "127.0.0.1",
                "CT",
                utcnow(),
            )
        )
    recorder.flush()
    recorder.stop()
    assert store.find("1.2.3.4").instances == 50
    assert len([e for e in audit.read() if e["event"] == "received"]) == 50


def test_instance_recorder_lingers_so_a_stream_of_instances_costs_one_transaction(tmp_path):
    import time
    from datetime import timedelta

    from ctp_node.node.receive.ingest import ReceivedInstance
    from ctp_node.node.receive.receiver import InstanceRecorder
    from ctp_node.node.shared.audit import AuditLog
    from ctp_node.node.shared.prometheus import NodeMetrics
    from ctp_node.node.shared.spool import SeriesKey

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    real, calls = store.record_instance, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("count"))
        return real(*args, **kwargs)

    store.record_instance = counted
    audit = AuditLog(tmp_path / "audit.jsonl")
    recorder = InstanceRecorder(store, audit, NodeMetrics(), linger_s=0.5)
    key, start = SeriesKey("1.2.3", "1.2.3.4"), utcnow() - timedelta(hours=1)
    for i in range(40):  # instances arriving 2 ms apart, as over one association
        at = start + timedelta(seconds=i)
        recorder.submit(ReceivedInstance(key, f"1.2.3.4.{i}", "1.2", tmp_path / f"{i}.dcm", "SCANNER", "h", "CT", at))
        time.sleep(0.002)
    recorder.flush()
    recorder.stop()
    assert store.find("1.2.3.4").instances == 40
    assert len(calls) <= 2 and sum(calls) == 40  # without the linger: one commit per instance
    lines = [e for e in audit.read() if e["event"] == "received"]
    # each line keeps the time its instance arrived, not the time the batch was written
    expected = [(start + timedelta(seconds=i)).isoformat(timespec="milliseconds") for i in range(40)]
    assert [e["time"] for e in lines] == expected


def test_opening_a_store_that_does_not_exist_creates_nothing(database_url, tmp_path):
    from sqlalchemy import create_engine, inspect

    from ctp_node.node.shared.jobs import StoreMissingError

    missing = (
        database_url if database_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'typo' / 'jobs.sqlite'}"
    )
    with pytest.raises(StoreMissingError, match="no job store at"):
        JobStore(missing, create=False)
    assert not (tmp_path / "typo").exists()
    if missing.startswith("postgresql"):
        engine = create_engine(missing)
        assert not inspect(engine).has_table("series")
        engine.dispose()
    JobStore(database_url)  # made once ...
    assert JobStore(database_url, create=False).read.counts()["receiving"] == 0  # ... it opens


def test_a_result_sent_with_a_warning_states_it_once(store):
    """What a result lacks although it is sent (outputs that could not be made) is the job's warning;
    a retried job recording the same result again does not repeat it."""
    job = received(store, at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    store.claim("w1", lease_s=60)
    reason = "perfusion outputs not made: the QA report failed"
    assert store.processed(job.id, "w1", 1, "/r", 1.0, [], warning=reason)
    assert store.find("1.2.3.4").warning == reason
    store.retry(job.id)
    store.claim("w1", lease_s=60)
    assert store.processed(job.id, "w1", 1, "/r", 1.0, [], warning=reason)
    assert store.find("1.2.3.4").warning == reason  # not twice
