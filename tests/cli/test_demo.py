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
        app,
        ["demo", "-o", str(out), "--checkpoint", str(checkpoint), "--matrix", "64", "--steps", "1"],
        catch_exceptions=False,
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
    assert set(summary) == {"about", "units", "acquired", "synthetic", "comparison"}
    assert all((out / f"perfusion_{key}.png").stat().st_size > 0 for key in ("acquired", "synthetic"))
    assert f"synthetic series {series[0].name}" in result.output
    # Tmax errors in seconds only: a relative error of a delay that is ~0 s in normal tissue means nothing.
    for key in ("acquired", "synthetic"):
        assert summary[key]["maps"]["tmax"]["grey"]["median_abs_error"] is not None
        assert all("median_rel_error" not in region for region in summary[key]["maps"]["tmax"].values())
        assert "median_rel_error" in summary[key]["maps"]["cbf"]["grey"]
    assert "Tmax has no relative error" in summary["about"] and summary["units"]["tmax"] == "s"
    assert summary["comparison"] and all(isinstance(sentence, str) for sentence in summary["comparison"])
    assert any(sentence.startswith("grey matter: the synthetic series' maps are") for sentence in summary["comparison"])


def _agreement(cbf: float, cbv: float, mtt: float, tmax_s: float, core_dice: float) -> dict:
    """An analysis' summary.json entry with the given grey-matter errors (white matter the same)."""
    region = {name: {"median_rel_error": value, "median_abs_error": value} for name, value in
              (("cbf", cbf), ("cbv", cbv), ("mtt", mtt))}  # fmt: skip
    maps = {name: {"grey": entry, "white": entry} for name, entry in region.items()}
    maps["tmax"] = {"grey": {"median_abs_error": tmax_s}, "white": {"median_abs_error": tmax_s}}
    return {"maps": maps, "core": {"dice": core_dice}, "hypoperfusion": {"dice": 0.8}}


def test_demo_says_in_words_where_the_synthetic_maps_are_worse():
    """The issue's numbers: the synthetic series' grey-matter CBF, CBV and MTT errors above the acquired
    series' were printed without a word."""
    from ctp_node.demo import compare_in_words

    sentences = compare_in_words(
        {"synthetic": _agreement(0.43, 0.23, 0.57, 0.4, 0.5), "acquired": _agreement(0.36, 0.17, 0.47, 1.2, 0.5)}
    )
    grey = next(s for s in sentences if s.startswith("grey matter"))
    assert "further from the truth than the acquired series' for CBF (43% vs 36%), CBV (23% vs 17%), MTT" in grey
    assert "closer for Tmax (0.4 s vs 1.2 s)" in grey
    assert any("core (rCBF < 30 %)" in s and "about the same as" in s for s in sentences)
    assert "not better than the acquired series'" in sentences[-1]
    same = compare_in_words(
        {"synthetic": _agreement(0.2, 0.2, 0.2, 1.0, 0.8), "acquired": _agreement(0.2, 0.2, 0.2, 1.0, 0.8)}
    )
    assert not any("further" in s or "not better" in s for s in same)


def test_demo_without_weights_says_it_runs_a_random_network(tmp_path, monkeypatch):
    monkeypatch.setattr("model.checkpoint.DEMO_WEIGHTS", tmp_path / "absent.pt")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--matrix", "64", "--steps", "1"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "RANDOMLY INITIALISED" in result.output and (out / "random-weights.pt").is_file()
