"""A node without ``[model] checkpoint`` runs the shipped demo weights, saying so, or refuses to start."""

import logging

import pytest

from ctp_node.config import Settings
from ctp_node.series.pipeline import SeriesPipeline
from tests.integration.node_helpers import cpu_checkpoint


def test_no_configured_checkpoint_falls_back_to_the_demo_weights_loudly(tmp_path, monkeypatch, caplog):
    demo = cpu_checkpoint(tmp_path / "demo.pt")
    monkeypatch.setattr("model.checkpoint.DEMO_WEIGHTS", demo)
    with caplog.at_level(logging.WARNING, logger="ctp_node.series.pipeline"):
        pipeline = SeriesPipeline.from_settings(Settings(model={"device": "cpu"}))
    assert "simulated phantom studies only" in caplog.text and "not for clinical use" in caplog.text
    assert pipeline.recipe.checkpoint_id.startswith("demo.pt sha256:")  # the derived series names the weights


def test_no_checkpoint_and_no_demo_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("model.checkpoint.DEMO_WEIGHTS", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint configured.*\[model\] checkpoint"):
        SeriesPipeline.from_settings(Settings(model={"device": "cpu"}))


def test_the_shipped_demo_weights_load_when_present():
    from model.checkpoint import DEMO_WEIGHTS, load_denoiser

    if not DEMO_WEIGHTS.is_file():
        pytest.fail(f"{DEMO_WEIGHTS} is missing: the repository ships demo weights (model/weights/MODEL_CARD.md)")
    loaded = load_denoiser(DEMO_WEIGHTS)
    assert loaded.info.format == "ctp-node" and DEMO_WEIGHTS.stat().st_size < 60 * 2**20
