"""`ctp-node demo` end to end on loopback, with a tiny network so that it runs in CI's minutes."""

import json

import pydicom
from typer.testing import CliRunner

from ctp_node.cli.main import app
from tests.integration.node_helpers import cpu_checkpoint


def test_demo_sends_receives_inpaints_and_compares_perfusion(tmp_path):
    checkpoint = cpu_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "-o", str(out), "-c", str(checkpoint), "--matrix", "64", "--steps", "1"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    series = [p for p in (out / "pacs").iterdir() if p.is_dir()]
    # 8 slices x every second 0..60 (acquired every 4 s): exactly one synthetic series landed
    synthetic = [p for p in series if len(list(p.glob("*.dcm"))) == 8 * 61]
    assert len(synthetic) == 1
    # and the perfusion outputs, each its own series: per analysis (synthetic, acquired) 4 maps, 4 colour
    # maps and an SR, plus one QA report. No SEG: acquired every 4 s, every lesion volume is withheld
    # (the SR says "Indeterminate" with the reason), and so are the masks.
    modalities = sorted(pydicom.dcmread(next(p.glob("*.dcm")), stop_before_pixels=True).Modality for p in series)
    assert len(series) == 1 + 2 * 9 + 1
    assert modalities.count("SR") == 2 and modalities.count("SEG") == 0
    reports = [pydicom.dcmread(next(p.glob("*.dcm"))) for p in (out / "pacs").iterdir() if p.is_dir()]
    texts = [str(el.value) for sr in reports if sr.Modality == "SR" for el in sr.iterall() if el.keyword == "TextValue"]
    assert any("needs samples at most 2 s apart" in text for text in texts)
    series = synthetic
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"acquired", "synthetic"}
    assert all((out / f"perfusion_{key}.png").stat().st_size > 0 for key in summary)
    assert f"synthetic series {series[0].name}" in result.output


def test_demo_without_weights_says_it_runs_a_random_network(tmp_path, monkeypatch):
    monkeypatch.setattr("model.checkpoint.DEMO_WEIGHTS", tmp_path / "absent.pt")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--matrix", "64", "--steps", "1"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "RANDOMLY INITIALISED" in result.output and (out / "random-weights.pt").is_file()
