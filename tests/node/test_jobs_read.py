"""The job store's read side (ctp_node/node/shared/jobs_read.py): plain data for the page, `ctp-node jobs` and
the metrics, on SQLite and PostgreSQL; and the completion policy the store is told (completeness.py)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from ctp_node.node.shared.completeness import CompletionPolicy, InstanceFacts, Wait
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.jobs_read import Delivery, JobQueries, JobRow, SeriesJob, State, utcnow
from ctp_node.node.shared.prometheus import NodeMetrics


@pytest.fixture()
def store(database_url):
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


def receive(store: JobStore, series_uid: str, seconds_ago: float = 120) -> None:
    store.record_instance("1.2.3", series_uid, "SCANNER", at=utcnow() - timedelta(seconds=seconds_ago))


def processed(store: JobStore, destinations: list[str]) -> SeriesJob:
    job = store.claim("w1", 60)
    assert store.processed(job.id, "w1", job.generation, "/results/x", 2.5, destinations)
    return job


def test_rows_are_plain_data_newest_first_with_their_deliveries_and_aware_times(store):
    for series in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        receive(store, series)
    store.queue_quiet_series(60)
    first = processed(store, ["pacs", "archive"])
    store.delivery_failed(store.pending_deliveries(first.id)[0].id, "refused", None)

    reads = store.read
    assert isinstance(reads, JobQueries)
    rows = reads.rows()
    assert [r.job.series_uid for r in rows] == ["1.2.3.6", "1.2.3.5", "1.2.3.4"]  # newest first
    row = rows[-1]
    assert isinstance(row, JobRow) and dataclasses.is_dataclass(row) and isinstance(row.job, SeriesJob)
    assert [(d.destination, d.state) for d in row.deliveries] == [("pacs", "failed"), ("archive", "pending")]
    assert all(isinstance(d, Delivery) for d in row.deliveries)
    assert [e["error"] for e in row.deliveries[0].error_history] == ["refused"]
    for moment in (row.queued_at, row.updated_at, row.job.first_received_at, row.job.last_received_at):
        assert moment.tzinfo is not None, "SQLite's naive datetimes are made UTC-aware on the read side"
    assert dict(row.stages())["processing"] == 2.5 and dict(row.stages())["until queued"] >= 0
    assert rows[0].deliveries == [] and rows[0].job.state == State.QUEUED

    with pytest.raises(dataclasses.FrozenInstanceError):
        row.job.state = State.DONE  # type: ignore[misc]


def test_filters_limits_one_job_and_counts(store):
    for series in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        receive(store, series)
    store.queue_quiet_series(60)
    job = processed(store, ["pacs"])
    reads = store.read

    assert [r.job.id for r in reads.rows([State.SENDING])] == [job.id]
    assert len(reads.rows(limit=2)) == 2
    assert [j.series_uid for j in reads.jobs([State.QUEUED])] == ["1.2.3.6", "1.2.3.5"]
    assert reads.jobs(limit=1)[0].series_uid == "1.2.3.6"
    assert reads.row(job.id).deliveries[0].destination == "pacs"
    assert reads.row(10_000) is None and reads.get(10_000) is None and reads.find("9.9") is None
    assert reads.find("1.2.3.4").id == job.id and reads.get(job.id).state == State.SENDING
    assert [d.state for d in reads.deliveries(job.id, "pending")] == ["pending"]
    assert reads.deliveries(job.id, "sent") == []
    counts = reads.counts()
    assert set(counts) == {s.value for s in State}, "every state named, 0 when none"
    assert (counts["queued"], counts["sending"], counts["done"]) == (2, 1, 0)


def test_confirmed_files_and_instance_counts(store):
    store.record_instance(
        "1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=120),
        instances=[InstanceFacts("1.2.3.4.1"), InstanceFacts("1.2.3.4.2"), InstanceFacts("1.2.3.4.1")],
    )  # fmt: skip
    store.queue_quiet_series(60)
    job = processed(store, ["pacs"])
    assert store.read.instance_count(job.id) == 2, "counted by SOPInstanceUID"
    (delivery,) = store.read.deliveries(job.id)
    store.confirm_files(delivery.id, ["a.dcm", "perfusion/cbf/b.dcm", "a.dcm"])
    assert store.read.confirmed_files(delivery.id) == {"a.dcm", "perfusion/cbf/b.dcm"}


def test_the_metrics_count_jobs_by_state_through_the_read_side(store):
    receive(store, "1.2.3.4")
    store.queue_quiet_series(60)
    metrics = NodeMetrics(store.read)
    assert metrics.registry.get_sample_value("ctp_node_jobs", {"state": "queued"}) == 1
    assert metrics.registry.get_sample_value("ctp_node_jobs", {"state": "done"}) == 0


# --- the completion policy (no store) -----------------------------------------------------------------

COMPLETE = [(f"0.00\\0.00\\{z}.00", f"t{t}", None) for t in range(1, 4) for z in range(2)]
INCOMPLETE = COMPLETE[:-1]


def never() -> list:
    raise AssertionError("the instances were read although the policy does not judge them")


def test_the_policy_decides_which_wait_applies():
    plain = CompletionPolicy(60)
    assert plain.wait(1, never) == Wait(60) and plain.shortest_s == 60 and not plain.judges
    policy = CompletionPolicy(60, complete_quiet_period_s=10, incomplete_wait_s=600)
    assert policy.shortest_s == 10
    assert policy.wait(1, lambda: COMPLETE) == Wait(10)
    assert policy.wait(2, lambda: COMPLETE) == Wait(60), "a re-opened series: more may come"
    incomplete = policy.wait(1, lambda: INCOMPLETE)
    assert incomplete.seconds == 600 and incomplete.warning.startswith("queued incomplete after 600 s")
    assert policy.wait(1, lambda: []) == Wait(60), "unknown: the ordinary quiet period"
    assert CompletionPolicy(60, complete_quiet_period_s=120).wait(1, lambda: COMPLETE) == Wait(60), "never longer"
    assert CompletionPolicy(60, incomplete_wait_s=5).wait(1, lambda: INCOMPLETE).seconds == 60, "never shorter"


def test_the_policy_of_the_series_settings():
    from ctp_node.config import SeriesSettings

    series = SeriesSettings(quiet_period_s=30, complete_quiet_period_s=5, incomplete_wait_s=300, min_time_points=4)
    assert CompletionPolicy.of(series) == CompletionPolicy(30, 5, 300, 4)
