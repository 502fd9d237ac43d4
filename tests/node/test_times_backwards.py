"""A series whose acquisition times run backwards (issue 23 item 10): it used to end "done" without a
word. Single-frame volumes are ordered by their times, which say when the images were acquired, and
the job states that the numbers disagree; Enhanced CT frames, ordered by TemporalPositionIndex, are
refused when their times contradict it, since which of the two is wrong cannot be told."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctp_node.config import GuardrailSettings, Settings, StorageSettings
from ctp_node.errors import MixedSeriesError
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.spool import SeriesKey, Spool
from ctp_node.node.work.series_processor import make_processor
from ctp_node.node.work.worker import Worker
from ctp_node.phantom.dicom_study import write_study
from ctp_node.series.assemble import assemble_series
from ctp_node.series.derived import DerivedRecipe
from ctp_node.series.pipeline import SeriesPipeline
from model.engine import LinearInpainter
from tests.series.helpers import ring_head

TIMES_S = (0.0, 4.0, 8.0)
RECIPE = DerivedRecipe("test model", "1", "test.pt sha256:0", "linear", 1)


def _reverse_times(paths: list[Path]) -> None:
    """Give the volume numbered first the last time and so on: the numbers and the times disagree."""
    headers = {p: pydicom.dcmread(p) for p in paths}
    times = sorted({str(ds.AcquisitionTime) for ds in headers.values()})
    for ds in headers.values():
        reversed_time = times[len(times) - 1 - times.index(str(ds.AcquisitionTime))]
        ds.AcquisitionTime = ds.ContentTime = reversed_time
    for path, ds in headers.items():
        ds.save_as(path)


@pytest.fixture
def backwards(tmp_path) -> tuple[np.ndarray, list[Path]]:
    series = ring_head(shape_zyx=(4, 64, 64), spacing_zyx=(5.0, 3.0, 3.0), times_s=TIMES_S)
    paths = write_study(series, tmp_path / "in", uid_seed="times run backwards")
    _reverse_times(paths)
    return series.hu, paths


def test_volumes_are_ordered_by_time_and_the_series_says_the_numbers_run_the_other_way(backwards):
    hu, paths = backwards
    assembled = assemble_series(paths)
    assert assembled.times_s.tolist() == list(TIMES_S)
    np.testing.assert_allclose(assembled.hu, np.rint(hu[::-1]), atol=1)  # the last-numbered volume came first
    assert len(assembled.warnings) == 1 and "run backwards against the instance numbers" in assembled.warnings[0]
    assert "2 of 2 steps" in assembled.warnings[0]


def test_a_series_in_order_carries_no_warning(tmp_path):
    series = ring_head(shape_zyx=(4, 64, 64), spacing_zyx=(5.0, 3.0, 3.0), times_s=TIMES_S)
    assert assemble_series(write_study(series, tmp_path, uid_seed="in order")).warnings == ()


def test_the_job_of_a_series_whose_times_run_backwards_ends_done_with_the_warning(backwards, tmp_path):
    _, paths = backwards
    settings = Settings(storage=StorageSettings(data_dir=tmp_path / "data"))  # no destination: done once processed
    store, spool = JobStore(settings.database_url), Spool(settings.storage.spool_dir)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    key = SeriesKey(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    for path in paths:
        spool.write(key, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), path.read_bytes())
        store.record_instance(key.study_uid, key.series_uid, "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    pipeline = SeriesPipeline(LinearInpainter(), RECIPE, guardrail=GuardrailSettings(policy="off"))
    worker = Worker(settings, store, make_processor(pipeline, progress=lambda done, total: None), worker_id="w1")
    job = store.get(worker.run_once().id)
    assert job.state == State.DONE, job.error
    assert job.warning and "run backwards against the instance numbers" in job.warning


def test_enhanced_frames_whose_times_contradict_their_temporal_index_are_refused_with_that_reason(tmp_path):
    series = ring_head(shape_zyx=(4, 64, 64), spacing_zyx=(5.0, 3.0, 3.0), times_s=TIMES_S)
    paths = write_study(series, tmp_path, layout="enhanced", uid_seed="enhanced backwards")
    for path in paths:
        ds = pydicom.dcmread(path)
        for frame in ds.PerFrameFunctionalGroupsSequence:
            content = frame.FrameContentSequence[0]
            content.TemporalPositionIndex = len(TIMES_S) + 1 - int(content.TemporalPositionIndex)
        ds.save_as(path)
    with pytest.raises(MixedSeriesError, match="run backwards against TemporalPositionIndex at 2 of 2 steps"):
        assemble_series(paths)
