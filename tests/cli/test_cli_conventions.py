"""What a person meets on the command line: one meaning per short flag, help that says what it
means, output that can be copied whole, errors in one line that name the right thing (issue 25)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.config import load_settings
from ctp_node.errors import ConfigError
from ctp_node.node.shared.jobs import JobStore, utcnow
from tests.cli_output import flat
from tests.integration.node_helpers import node_settings, write_config

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# A series UID as long as DICOM allows (64 characters), and a path longer than any terminal line.
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678"
assert len(LONG_UID) == 64


def commands() -> list[tuple[str, Any]]:
    """Every command of `ctp-node`, subcommands of groups included, by its full name."""
    found = []

    def walk(command: Any, name: str) -> None:
        if hasattr(command, "commands"):  # a group (typer carries its own copy of click's classes)
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}")
        else:
            found.append((name, command))

    walk(typer.main.get_command(app), "ctp-node")
    return found


def test_short_c_is_config_in_every_command():
    """`-c` was --checkpoint for demo, evaluate and infer, --config elsewhere: now only --config."""
    seen_config = 0
    for name, command in commands():
        for param in command.params:
            opts = [*param.opts, *getattr(param, "secondary_opts", [])]
            if "-c" in opts:
                assert "--config" in opts, f"{name}: -c is {opts}, not --config"
            if "--config" in opts:
                assert "-c" in opts, f"{name}: --config without -c"
                seen_config += 1
            if "--checkpoint" in opts:
                assert "-c" not in opts, f"{name}: -c is the checkpoint"
    assert seen_config >= 9  # serve, worker, jobs x4, echo, process, reprocess, config, train


def test_a_config_given_to_demo_is_not_read_as_a_checkpoint(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[dicom]\nport = 11112\n")
    result = runner.invoke(app, ["demo", "-c", str(config), "-o", str(tmp_path / "demo")])
    assert result.exit_code == 2
    assert "No such option: -c" in flat(result.output) and "checkpoint" not in flat(result.output).lower()
    assert not (tmp_path / "demo").exists()


def test_help_has_no_type_label_on_flags_and_says_what_the_root_c_means():
    for name, _ in commands():
        result = runner.invoke(app, [*name.split()[1:], "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, name
        assert "<bool>" not in result.output, f"{name} --help labels a flag <bool>"
    root = flat(runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output)
    assert "-c is --config in every command" in root


def test_phantom_help_gives_the_matrix_and_slices_defaults():
    text = flat(runner.invoke(app, ["phantom", "--help"], env={"COLUMNS": "200"}).output)
    assert "In-plane pixels. [default: (512; 192 with --layout npy; 256 with --family b)]" in text
    assert "Number of 5 mm slices. [default: (16; 8 with --layout npy or --family b)]" in text


@pytest.fixture()
def configured(tmp_path):
    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", 4242)
    return settings, write_config(tmp_path / "ctp-node.toml", settings)


def _failed_job_with_long_names(settings) -> str:
    store = JobStore(settings.database_url)
    store.record_instance("1.2.3", LONG_UID, "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    job = store.claim("w", 60)
    long_path = "/var/lib/ctp-node/results/" + "/".join(["a-rather-long-folder-name"] * 6) + "/volume_0007.dcm"
    store.failed(job.id, "w", f"IncompleteSeriesError: {long_path} lacks slice 7")
    return long_path


def _whole_on_one_line(text: str, *pieces: str) -> None:
    for piece in pieces:
        assert any(piece in line for line in text.splitlines()), f"{piece!r} is split or cut in:\n{text}"


def test_jobs_list_keeps_uids_and_paths_whole_when_not_a_terminal(configured):
    settings, config = configured
    long_path = _failed_job_with_long_names(settings)
    result = runner.invoke(app, ["jobs", "list", "-c", str(config)])  # CliRunner: not a terminal
    assert result.exit_code == 0, result.output
    _whole_on_one_line(result.output, LONG_UID, long_path)


def test_jobs_list_through_a_pipe_keeps_uids_and_paths_whole(configured):
    settings, config = configured
    long_path = _failed_job_with_long_names(settings)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = subprocess.run(
        [sys.executable, "-m", "ctp_node", "jobs", "list", "-c", str(config)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _whole_on_one_line(proc.stderr, LONG_UID, long_path)


def test_the_demo_lines_stay_whole_through_a_pipe(tmp_path):
    """The demo says what it did through the shared console (ctp_node.cli.progress.stderr)."""
    folder = tmp_path / ("demo-output-" + "x" * 90) / "pacs" / LONG_UID
    code = (
        "import sys; from ctp_node.cli.progress import stderr; "
        "stderr.print(f'synthetic 1 s series {sys.argv[1]}: 488 instances landed in {sys.argv[2]}')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = subprocess.run(
        [sys.executable, "-c", code, LONG_UID, str(folder)], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"synthetic 1 s series {LONG_UID}: 488 instances landed in {folder}"]


def test_a_missing_job_store_names_the_right_key_once(tmp_path):
    data = tmp_path / "typo"
    config = write_config(tmp_path / "ctp-node.toml", node_settings(data, tmp_path / "net.pt", 4242))
    result = runner.invoke(app, ["jobs", "list", "-c", str(config)])
    assert result.exit_code == 2
    text = flat(result.output)
    assert "jobs.database_url" in text and "storage.database_url" not in text
    assert text.count("data_dir") == 1 and text.count("database_url") == 1, text
    assert f"configuration: {config}" in text


def test_validation_errors_name_the_key_and_value_without_pydantic_links(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[dicom]\nport = "eleven"\nbogus = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "errors.pydantic.dev" not in message and "further information" not in message
    assert "dicom.port: Input should be a valid integer" in message and "'eleven'" in message
    assert "dicom.bogus: unknown key" in message
    result = runner.invoke(app, ["config", "--check", "-c", str(path)])
    assert result.exit_code == 2 and "(got 'eleven')" in result.output  # not eaten as Rich markup


def test_validation_errors_never_print_a_credential(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[web]\nenabled = true\ntoken = "0123456789abcdef0123-secret"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "web.token" in str(caught.value) and "secret" not in str(caught.value)


def test_the_password_tool_has_help_and_no_runtime_warning():
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "ctp_node.web.passwords", "--help"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "sys.modules" not in proc.stderr
    assert "basic_password_hash" in proc.stdout and "twice" in proc.stdout
    made = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "ctp_node.web.passwords"],
        input="correct horse battery staple\n", capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0 and made.stdout.startswith("scrypt$"), made.stderr


def test_the_web_package_still_offers_its_names():
    from ctp_node import web

    assert callable(web.start_web) and callable(web.create_app) and isinstance(web.WebServer, type)
    with pytest.raises(AttributeError):
        web.no_such_name  # noqa: B018


def test_library_info_lines_are_kept_out_of_the_log():
    import logging

    from ctp_node.logs import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        for name in ("highdicom", "highdicom.base", "highdicom.seg.sop", "pynetdicom.assoc"):
            logger = logging.getLogger(name)
            assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING), name
        assert logging.getLogger("ctp_node.node.work.worker").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], root.level = handlers, level
        for name in ("highdicom", "pynetdicom"):
            logging.getLogger(name).setLevel(logging.NOTSET)


# ctp-node perfusion and a truth.npz ------------------------------------------------------------


def _study(folder: Path) -> list[str]:
    from tests.perfusion.synthetic import synthetic_head

    folder.mkdir(parents=True, exist_ok=True)
    times = np.arange(0.0, 40.0, 1.0)
    hu, _ = synthetic_head(times, size=32)
    np.save(folder / "study.npy", hu)
    (folder / "study.json").write_text(json.dumps({"times_s": times.tolist(), "spacing_mm": [5.0, 1.0, 1.0]}))
    return ["perfusion", str(folder / "study.npy"), "-o", str(folder / "out")]


def test_a_truth_npz_beside_or_above_the_input_is_not_used_unless_given(tmp_path):
    """Other studies' truth.npz (here not even a phantom's) beside and above the input: ignored."""
    args = _study(tmp_path / "study")
    np.savez(tmp_path / "study" / "truth.npz", something=np.zeros(3))
    np.savez(tmp_path / "truth.npz", other=np.ones(2))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "against" not in result.output
    assert "agreement_with_truth" not in json.loads((tmp_path / "study" / "out" / "summary.json").read_text())


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: np.savez(p, tmax=np.zeros((2, 32, 32))), "it has no cbf, cbv, labels, core_mask"),
        (lambda p: p.write_text("not an archive"), "not an .npz archive"),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or p.with_suffix(".npy").rename(p), "one array"),
    ],
)
def test_a_truth_that_is_not_a_phantoms_is_one_line_naming_what_is_wrong(tmp_path, write, reason):
    args = _study(tmp_path)
    truth = tmp_path / "given.npz"
    write(truth)
    result = runner.invoke(app, [*args, "--truth", str(truth)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert f"--truth {truth} is not a phantom's truth" in lines[0] and reason in lines[0]
    assert not (tmp_path / "out").exists()  # refused before the analysis


def test_a_usage_error_outside_a_terminal_is_plain_lines_with_the_value_whole(tmp_path):
    # Typer draws its error box at 80 columns when stderr is not a terminal; a long path was split.
    missing = tmp_path / ("a-folder-name-long-enough-to-cross-eighty-columns-" * 2) / "series"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    result = subprocess.run(
        [sys.executable, "-m", "ctp_node", "perfusion", str(missing)],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "╭" not in result.stderr and "│" not in result.stderr
    assert f"Error: Invalid value: {missing} does not exist" in result.stderr
    assert "ctp_node perfusion --help' for help." in result.stderr
