"""`ctp-node perfusion` through typer's CliRunner on small arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.perfusion.figure import DPI, FIGSIZE_IN
from tests.cli_output import flat
from tests.perfusion.synthetic import synthetic_head

TIMES = np.arange(0.0, 40.0, 1.0)
runner = CliRunner()


def test_npy_with_sidecar_writes_maps_summary_nifti_and_figure(tmp_path):
    hu, truth = synthetic_head(TIMES, size=40)
    np.save(tmp_path / "study.npy", hu)
    (tmp_path / "study.json").write_text(json.dumps({"times_s": TIMES.tolist(), "spacing_mm": [5.0, 1.0, 1.0]}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["perfusion", str(tmp_path / "study.npy"), "-o", str(out), "--nifti", "--k", "1"])
    assert result.exit_code == 0, result.output
    assert "core" in result.output and "mL" in result.output
    maps = np.load(out / "maps.npz")
    assert maps["cbf"].shape == (2, 40, 40) and maps["core_mask"].dtype == bool
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 1.0 and summary["spacing_mm"] == [5.0, 1.0, 1.0]
    assert summary["core_volume_ml"] == np.sum(maps["core_mask"]) * 0.005
    for name in ("cbf", "tmax", "core_mask"):
        assert (out / f"{name}.nii.gz").stat().st_size > 0
    import SimpleITK as sitk

    image = sitk.ReadImage(str(out / "cbf.nii.gz"))
    assert image.GetSize() == (40, 40, 2) and image.GetSpacing() == (1.0, 1.0, 5.0)
    with Image.open(out / "perfusion.png") as png:
        assert png.size == (int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI))


def test_model_layout_windowed_and_skull_stripped(tmp_path):
    hu, truth = synthetic_head(TIMES, size=192)
    hu = np.where(truth["brain"], np.clip(hu, 0, 80), 0)  # published: windowed, skull-stripped
    layout = np.moveaxis(np.concatenate([hu] * 4, axis=1), 0, -1)  # (8, 192, 192, T)
    np.save(tmp_path / "seq.npy", layout.astype(np.float32))
    out = tmp_path / "out"
    result = runner.invoke(app, ["perfusion", str(tmp_path / "seq.npy"), "--model-layout", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["times_s"] == TIMES.tolist()  # 1 s apart by default
    assert summary["core_volume_ml"] is None  # no spacing given
    assert max(summary["aif_curve_hu"]) < 45  # saturated at the window top: 80 - 40 HU
    assert (out / "perfusion.png").exists()


def test_missing_times_is_a_usage_error(tmp_path):
    np.save(tmp_path / "bare.npy", np.zeros((8, 1, 4, 4), np.float32))
    result = runner.invoke(app, ["perfusion", str(tmp_path / "bare.npy"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "give --times or a sidecar bare.json" in flat(result.output)


def test_analysis_failure_exits_1_with_the_reason(tmp_path):
    hu, _ = synthetic_head(TIMES, size=32)
    np.save(tmp_path / "s.npy", hu)
    result = runner.invoke(
        app, ["perfusion", str(tmp_path / "s.npy"), "--times", ",".join(map(str, TIMES[:-1])), "-o", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "times_s has 39 values but the series has 40 frames" in result.output


def test_dicom_folder_with_irregular_sampling(tmp_path):
    """Phantom -> vendor-like DICOM (1 s, then 3 s after 20 s) -> assemble -> maps with geometry."""
    import SimpleITK as sitk

    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=64, slices=2, duration_s=45, seed=1))
    series = sample_study(study, parse_schedule("irregular:1@20,3"))
    write_study(series, tmp_path / "dicom", vendor="siemens")
    out = tmp_path / "out"
    result = runner.invoke(app, ["perfusion", str(tmp_path / "dicom"), "-o", str(out), "--nifti"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["times_s"][19:23] == [19.0, 20.0, 23.0, 26.0]
    assert any("linearly resampled to a 1 s grid" in note for note in summary["notes"])
    # 3 s during the bolus: the volumes are measured but withheld, with the reason.
    assert summary["volume_checks"]["tmax6"]["measured_ml"] > 0 and summary["hypoperfusion_volume_ml"] is None
    assert "acquired every 3.0 s during the bolus" in summary["volume_checks"]["tmax6"]["withheld"]
    image = sitk.ReadImage(str(out / "tmax.nii.gz"))
    assert image.GetSpacing() == pytest.approx((3.75, 3.75, 5.0))
    assert image.GetOrigin() == pytest.approx(series.origin)


def test_not_a_ctp_folder_is_a_usage_error(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "note.txt").write_text("not DICOM")
    result = runner.invoke(app, ["perfusion", str(tmp_path / "junk"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "junk is not one complete CTP series" in flat(result.output)


def test_given_aif_mask_is_used(tmp_path):
    hu, truth = synthetic_head(TIMES, size=40)
    np.save(tmp_path / "s.npy", hu)
    np.save(tmp_path / "aif.npy", np.broadcast_to(truth["artery"], hu.shape[1:]))
    times = ",".join(str(t) for t in TIMES)
    out = tmp_path / "out"
    args = ["perfusion", str(tmp_path / "s.npy"), "--times", times, "--aif-mask", str(tmp_path / "aif.npy")]
    result = runner.invoke(app, [*args, "-o", str(out), "--smooth-mm", "0"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "summary.json").read_text())["aif_voxels_zyx"]) == 2 * 9


def test_noise_handling_option_and_reported_statistics(tmp_path):
    hu, _ = synthetic_head(TIMES, size=40, noise_hu=2.0)
    np.save(tmp_path / "s.npy", hu)
    times = ",".join(str(t) for t in TIMES)
    base = ["perfusion", str(tmp_path / "s.npy"), "--times", times, "--spacing", "5,1,1"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "tips")])
    assert result.exit_code == 0, result.output
    assert "reference CBF" in result.output and "Tmax > 10 s" in result.output and "noise" in result.output
    summary = json.loads((tmp_path / "tips" / "summary.json").read_text())
    assert summary["method"] == "parametric" and summary["noise_hu"] == pytest.approx(2.0, rel=0.3)
    plain = runner.invoke(app, [*base, "--denoise", "none", "--method", "bsvd", "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["noise_hu"] is None
    bad = runner.invoke(app, [*base, "--denoise", "median", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--denoise must be tips, gaussian or none" in flat(bad.output)


def test_phantom_family_b_in_the_model_layout(tmp_path):
    result = runner.invoke(
        app, ["phantom", str(tmp_path), "--family", "b", "--layout", "npy", "--duration", "40", "--noise", "6"]
    )
    assert result.exit_code == 0, result.output
    array = np.load(tmp_path / "phantom.npy")
    assert array.shape == (8, 192, 192, 40)
    sidecar = json.loads((tmp_path / "phantom.json").read_text())
    assert sidecar["config"]["pixel_mm"] == pytest.approx(1.2) and sidecar["config"]["matrix"] == 192
    truth = np.load(tmp_path / "truth.npz")
    assert truth["core_mask"].any() and truth["cbf"].shape == (8, 192, 192)


def test_phantom_with_truth_reports_volumes_input_functions_and_agreement(tmp_path):
    from ctp_node.phantom.export import write_truth
    from ctp_node.phantom.family_b import FamilyBConfig, generate_family_b

    study = generate_family_b(FamilyBConfig(seed=9, matrix=200, slices=2, duration_s=45, noise_hu=6.0))
    np.save(tmp_path / "study.npy", study.hu)
    sidecar = {"times_s": study.times_s.tolist(), "spacing_mm": list(study.spacing_mm)}
    (tmp_path / "study.json").write_text(json.dumps(sidecar))
    write_truth(study, tmp_path / "truth.npz")
    truth = ["--truth", str(tmp_path / "truth.npz")]  # only ever the one given
    result = runner.invoke(app, ["perfusion", str(tmp_path / "study.npy"), "-o", str(tmp_path / "out"), *truth])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for expected in ("Tmax > 10 s", "mismatch", "hypoperfusion intensity ratio", "AIF voxels", "VOF voxels"):
        assert expected in text
    assert f"against {tmp_path / 'truth.npz'}" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    agreement = summary["agreement_with_truth"]
    assert set(agreement) >= {"core_ml", "core_true_ml", "tmax6_ml", "cbf_wm_rel", "tmax_normal_s"}
    assert abs(agreement["cbv_wm_rel"]) < 0.2  # the analysis, not only the report, is sane
    assert summary["input_functions"]["vof"] is not None
    saved = np.load(tmp_path / "out" / "maps.npz")
    assert {"vof_voxels", "vof_curve", "severe_hypoperfusion_mask", "aif_curve_uncorrected"} <= set(saved.files)
    # The core's range under the study's own noise, everywhere the volume is: printed, in the summary, and the
    # per-voxel spread as a map of its own.
    assert {"cbf_sd", "cbf_sd_evaluated"} <= set(saved.files) and saved["cbf_sd"][saved["cbf_sd_evaluated"]].min() >= 0
    noise = summary["volume_checks"]["core"]["noise"]
    assert noise["range_ml"][0] <= summary["volume_checks"]["core"]["measured_ml"] <= noise["range_ml"][1]
    assert "core under the study's own noise" in text


def test_missing_truth_file_is_a_usage_error(tmp_path):
    hu, _ = synthetic_head(TIMES, size=32)
    np.save(tmp_path / "s.npy", hu)
    times = ",".join(str(t) for t in TIMES)
    args = ["perfusion", str(tmp_path / "s.npy"), "--times", times, "--truth", str(tmp_path / "none.npz")]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "none.npz does not exist" in flat(result.output)
