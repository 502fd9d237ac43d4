"""run_series: the one path of a series, with or without writing; the record of what fills each second."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest

from ctp_node.config import GuardrailSettings
from ctp_node.errors import NotCTPError
from ctp_node.phantom.dicom_study import write_study
from ctp_node.series.derived import DerivedRecipe
from ctp_node.series.pipeline import SeriesPipeline, run_series
from model.engine import LinearInpainter
from tests.series.helpers import ring_head

RECIPE = DerivedRecipe("test model", "1", "test.pt sha256:0", "linear", 1)


@pytest.fixture(scope="module")
def ring_files(tmp_path_factory):
    series = ring_head(shape_zyx=(8, 96, 96), spacing_zyx=(5.0, 2.0, 2.0), times_s=(0.0, 4.0, 8.0))
    return series, write_study(series, tmp_path_factory.mktemp("ring"), uid_seed="run-series ring")


def test_without_an_output_folder_nothing_is_written_and_the_arrays_come_back(ring_files):
    series, _ = ring_files
    result = run_series(SeriesPipeline(LinearInpainter(), guardrail=GuardrailSettings(policy="off")), series)
    assert result.derived is None and "write" not in result.seconds
    assert result.hu.shape == (9, *series.hu.shape[1:]) and result.brain_mask.shape == series.hu.shape[1:]
    np.testing.assert_array_equal(result.hu[[0, 4, 8]], series.hu)
    assert result.synthetic.tolist() == [s % 4 != 0 for s in range(9)]
    assert all(f.voxels is not None for f in result.fill.fills)  # the source-grid stage's counts, per second


def test_the_written_series_follows_the_one_fill_record(ring_files, tmp_path):
    _, files = ring_files
    result = run_series(SeriesPipeline(LinearInpainter(), RECIPE), files, tmp_path)
    assert result.derived is not None and result.derived.count == 9 * 8
    for fill in result.fill.fills:
        ds = pydicom.dcmread(tmp_path / f"CTP1S_{fill.second:04d}_000.dcm", stop_before_pixels=True)
        assert ds.ImageComments.startswith(fill.kind.upper())
        assert (fill.kind == "acquired") == (list(ds.ImageType)[1] == "PRIMARY")


def test_the_first_source_file_is_read_once_for_its_header(ring_files, tmp_path, monkeypatch):
    _, files = ring_files
    reads = []
    original = pydicom.dcmread

    def counting(path, *args, **kwargs):
        if str(path) == str(files[0]):
            reads.append(kwargs.get("stop_before_pixels", False))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    run_series(SeriesPipeline(LinearInpainter(), RECIPE), files, tmp_path)
    assert reads.count(True) == 1  # one header read (the template), plus the pixels once
    assert len(reads) == 2


def test_writing_needs_a_recipe(ring_files, tmp_path):
    series, _ = ring_files
    with pytest.raises(ValueError, match="no output recipe"):
        run_series(SeriesPipeline(LinearInpainter()), series, tmp_path)


def test_the_node_refuses_its_own_output(ring_files, tmp_path):
    _, files = ring_files
    first = run_series(SeriesPipeline(LinearInpainter(), RECIPE), files, tmp_path / "first")
    with pytest.raises(NotCTPError, match="own synthetic output"):
        run_series(SeriesPipeline(LinearInpainter(), RECIPE), first.derived.paths, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_the_series_pipeline_does_not_import_the_job_system():
    code = (
        "import sys, ctp_node.series.pipeline; sys.exit(int(any(m.startswith('ctp_node.node') for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_motion_stage_replaces_a_volume_it_cannot_rescue_and_says_so(tmp_path):
    from ctp_node.config import MotionSettings
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.motion import SliceMotion
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    broken = 3  # the 4th acquired volume (12 s): its lower slices moved 3 mm during the volume
    study = generate_phantom(
        PhantomConfig(
            matrix=96, slices=8, duration_s=29, noise_hu=6.0, supersample=3, seed=5,
            slice_motions=(
                SliceMotion(8, 0, 7, (0.0, 0.0, 2.0), (1.5, -1.0, 0.0)),  # the whole head moved: rescued
                SliceMotion(12, 4, 7, translation_mm=(3.0, 0.0, 0.0)),  # moved during the volume: not
            ),
        )
    )  # fmt: skip
    acquired = sample_study(study, parse_schedule("every:4"))
    assert float(acquired.times_s[broken]) == 12.0
    files = write_study(acquired, tmp_path / "in", uid_seed="motion stage")
    pipeline = SeriesPipeline(LinearInpainter(), RECIPE, guardrail=GuardrailSettings(policy="off"))
    still = run_series(pipeline, files, tmp_path / "without")
    at_12_s = int(np.flatnonzero(still.fill.seconds == 12)[0])  # the acquisition starts at 0 s
    assert still.motion is None and still.fill.fills[at_12_s].kind == "acquired"

    pipeline.motion = MotionSettings()
    result = run_series(pipeline, files, tmp_path / "with")
    assert not result.motion.usable[broken] and result.motion.usable.sum() == len(acquired.times_s) - 1
    assert "1 unusable" in result.motion.comment()
    second = result.fill.fills[at_12_s]
    assert second.kind != "acquired" and second.replaces == broken  # inpainted like a gap
    comment = str(pydicom.dcmread(result.derived.paths[0], stop_before_pixels=True).ImageComments)
    assert "motion:" in comment and "1 unusable" in comment and "12 s" in comment
    assert (tmp_path / "with" / "motion.json").is_file()
    at_8_s = int(np.flatnonzero(result.fill.seconds == 8)[0])
    assert result.motion.corrected[2] and result.fill.fills[at_8_s].kind == "acquired"
    realigned = str(pydicom.dcmread(result.derived.paths[at_8_s * 8], stop_before_pixels=True).ImageComments)
    assert "realigned to the baseline by rigid registration" in realigned and "unchanged" not in realigned
    # The images standing in for the broken volume say which volume they replace and why.
    replacing = str(pydicom.dcmread(result.derived.paths[at_12_s * 8], stop_before_pixels=True).ImageComments)
    assert "replaces the volume acquired at 12 s, not used:" in replacing
    assert any(reason in replacing for reason in result.motion.volumes[broken].reasons)


def test_a_series_the_motion_check_cannot_run_on_goes_on_unchecked(ring_files, tmp_path):
    from ctp_node.config import MotionSettings

    series, files = ring_files  # 3 volumes: too few to tell motion from contrast
    pipeline = SeriesPipeline(LinearInpainter(), RECIPE, motion=MotionSettings())
    result = run_series(pipeline, files, tmp_path)
    assert result.motion is None and any(note.startswith("motion not checked") for note in result.notes)
    assert result.derived is not None


def test_a_scan_every_8_s_sends_no_tmax_volume_and_says_why(tmp_path):
    """Issue 20/21: synthetic seconds are not acquisitions. With a bolus acquired every 8 s the synthetic
    series' Tmax volumes are withheld (SR: "Indeterminate", the reason in the SR, the job's notes and the
    guardrail's volume checks), whatever fills the seconds."""
    import highdicom as hd

    from ctp_node.config import PerfusionOutputSettings
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=96, slices=4, duration_s=49, noise_hu=6.0, seed=3))
    files = write_study(sample_study(study, parse_schedule("every:8")), tmp_path / "in", uid_seed="every 8 s")
    # The QA report too: linear seconds are dropped by the analysis, whose times are then a subset of the
    # series' (the report's curves once failed on that: x and y of different lengths).
    settings = PerfusionOutputSettings(quantitative_maps=False, colour_maps=False)
    pipeline = SeriesPipeline(LinearInpainter(), RECIPE, guardrail=GuardrailSettings(), perfusion_outputs=settings)
    result = run_series(pipeline, files, tmp_path / "out")
    for label in ("synthetic", "acquired"):
        assert any(note.startswith(f"{label}: tmax6 volume withheld: acquired every 8.0 s") for note in result.notes)
    volume_checks = {c.name: c for c in result.guardrail.checks if "volume vs acquired" in c.name}
    assert volume_checks["Tmax > 6 s volume vs acquired"].value is None  # nothing to compare: both withheld
    sr_path = next(p for s in result.outputs if s.kind == "sr" and s.analysis == "synthetic" for p in s.paths)
    groups = {g.tracking_identifier: g for g in hd.sr.srread(sr_path).content.get_image_measurement_groups()}
    assert not groups["Tmax>6s"].get_measurements()
    assert groups["Tmax>6s"].get_qualitative_evaluations()[0].value.meaning == "Indeterminate"
    assert "Mismatch ratio" not in groups
    assert not result.warnings, result.warnings  # every output written, the QA report included
    assert any(s.kind == "qa_report" for s in result.outputs)
