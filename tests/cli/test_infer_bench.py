import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from model.checkpoint import save_checkpoint
from tests.cli_output import flat
from tests.model.helpers import tiny_net

runner = CliRunner()


@pytest.fixture()
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "tiny.pt", tiny_net())


def sequence(path, t=5, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0, 80, (8, 16, 16, t)).astype(np.float32)
    np.save(path, arr)
    return arr


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_infer_gap_writes_1s_sequence_and_sidecar(tmp_path, checkpoint):
    arr = sequence(tmp_path / "case01.npy")
    out = tmp_path / "out"
    result = run(
        "infer",
        tmp_path / "case01.npy",
        "--gap",
        4,
        "--checkpoint",
        checkpoint,
        "-o",
        out,
        "--steps",
        2,
        "--device",
        "cpu",
        "-q",
    )
    assert result.exit_code == 0, result.output
    seq = np.load(out / "case01_1s.npy")
    assert seq.shape == (8, 16, 16, 17)
    np.testing.assert_allclose(seq[..., 4], arr[..., 1], atol=1e-4)  # known seconds unchanged
    assert seq.min() >= 0 and seq.max() <= 80
    meta = json.loads((out / "case01_1s.json").read_text())
    assert meta["synthetic"] == [s % 4 != 0 for s in range(17)]
    assert meta["times_s"] == list(range(17)) and meta["research_use_only"]
    assert meta["checkpoint"]["format"] == "ctp-node"


def test_infer_from_full_and_times_and_samples(tmp_path, checkpoint):
    sequence(tmp_path / "full.npy", t=9)
    out = tmp_path / "out"
    result = run(
        "infer",
        tmp_path / "full.npy",
        "--from-full",
        4,
        "--checkpoint",
        checkpoint,
        "-o",
        out,
        "--steps",
        1,
        "--device",
        "cpu",
        "-q",
        "--samples",
        2,
    )
    assert result.exit_code == 0, result.output
    assert np.load(out / "full_1s.npy").shape[-1] == 9
    assert np.load(out / "full_spread.npy").shape == (8, 16, 16, 9)
    sequence(tmp_path / "irregular.npy", t=4)
    result = run(
        "infer",
        tmp_path / "irregular.npy",
        "--times",
        "0,1.5,4.2,7",
        "--checkpoint",
        checkpoint,
        "-o",
        out,
        "--steps",
        1,
        "--device",
        "cpu",
        "-q",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "irregular_1s.json").read_text())
    assert meta["max_snap_error_s"] == pytest.approx(0.5)
    assert meta["synthetic"] == [False, True, False, True, False, True, True, False]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gap", "4", "--times", "0,4"], "exactly one of"),
        ([], "exactly one of"),
        (["--gap", "12"], "longer than the trained maximum"),
        (["--times", "0,4"], "5 volumes but 2 times"),
        (["--gap", "4", "--unusable", "9"], "outside 0..4"),
        (["--gap", "4", "--sampler", "euler"], "sampler"),
        (["--gap", "-1"], "positive"),
    ],
)
def test_infer_bad_input_gets_a_clear_error(tmp_path, checkpoint, extra, message):
    sequence(tmp_path / "s.npy")
    result = runner.invoke(
        app,
        [
            "infer",
            str(tmp_path / "s.npy"),
            "--checkpoint",
            str(checkpoint),
            "-o",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "-q",
            "--steps",
            "1",
            *extra,
        ],
    )
    assert result.exit_code != 0
    assert message in flat(result.output)


def test_infer_long_gap_linear_policy(tmp_path, checkpoint):
    sequence(tmp_path / "s.npy", t=3)
    result = run(
        "infer",
        tmp_path / "s.npy",
        "--times",
        "0,4,14",
        "--long-gap",
        "linear",
        "--checkpoint",
        checkpoint,
        "-o",
        tmp_path / "o",
        "--steps",
        1,
        "--device",
        "cpu",
        "-q",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "o" / "s_1s.json").read_text())
    assert meta["interpolated"] == [False] * 5 + [True] * 9 + [False]


def test_bad_checkpoint_is_reported(tmp_path):
    sequence(tmp_path / "s.npy")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(
        app, ["infer", str(tmp_path / "s.npy"), "--gap", "4", "--checkpoint", str(tmp_path / "bad.pt")]
    )
    assert result.exit_code == 2
    assert "truncated or corrupt" in flat(result.output)


def test_bench_writes_json_with_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "bench",
        "--device",
        "cpu",
        "--network",
        "tiny",
        "--volume",
        "8x16x16",
        "--steps",
        1,
        "--published-steps",
        1,
        "--warm-runs",
        1,
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU")
    assert data["engine"]["synthetic_volumes"] == 45
    assert data["published_loop"]["ms_per_step"] > 0 and data["engine"]["ms_per_volume_step"] > 0
    assert data["speedup_study"] == pytest.approx(
        data["published_loop"]["study_estimate_s"] / data["engine"]["study_s"]
    )
    assert "speed-up" in result.output


def test_version_and_help():
    assert run("--version").output.startswith("ctp-node ")
    result = run("--help")
    assert "infer" in result.output and "bench" in result.output
