from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.config import load_settings, tomllib
from ctp_node.errors import ConfigError

runner = CliRunner()


def write(tmp_path, text):
    path = tmp_path / "ctp-node.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_need_no_service(monkeypatch):
    monkeypatch.delenv("CTP_NODE_CONFIG", raising=False)
    settings = load_settings()
    assert settings.dicom.ae_title == "CTPNODE" and settings.dicom.port == 11112
    assert settings.database_url.startswith("sqlite:///") and settings.database_url.endswith("jobs.sqlite")
    assert settings.series.quiet_period_s == 60
    assert settings.series.complete_quiet_period_s == 10 and settings.series.incomplete_wait_s == 600
    assert settings.destinations == ()
    # absolute, never the folder the node happens to be started from
    assert settings.storage.data_dir == Path("/var/lib/ctp-node")
    assert settings.database_url == "sqlite:////var/lib/ctp-node/jobs.sqlite"


def test_file_then_environment_overrides(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        """
[dicom]
ae_title = "CTPLAB"
port = 11200
allowed_callers = [{ae_title = "SCANNER1", host = "10.0.0.5"}, {ae_title = "PACS"}]

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 4242
ae_title = "ORTHANC"
""",
    )
    monkeypatch.setenv("CTP_NODE_DICOM__PORT", "11300")
    monkeypatch.setenv("CTP_NODE_MODEL__STEPS", "12")
    settings = load_settings(path)
    assert settings.dicom.ae_title == "CTPLAB"
    assert settings.dicom.port == 11300  # environment wins over the file
    assert settings.model.steps == 12
    assert settings.dicom.allowed_callers[0].host == "10.0.0.5"
    assert settings.destinations[0].ae_title == "ORTHANC"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dicom]\nport = 70000\n", "port"),
        ('[dicom]\nae_title = "A\\\\B"\n', "not a valid AE title"),
        ('[dicom]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "not a valid AE title"),
        ("[dicom]\nbogus = 1\n", "bogus"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[jobs]\nlease_s = 10\nheartbeat_s = 20\n", "heartbeat_s"),
        ('[model]\nsampler = "euler"\n', "sampler"),
        (
            "[[destinations]]\nname='a'\nhost='h'\nport=1\nae_title='X'\n[[destinations]]\nname='a'\nhost='h'\nport=2\n"
            "ae_title='Y'\n",
            "unique",
        ),
        ("this is = not toml [", "not valid TOML"),
        ('[storage]\ndata_dir = "ctp-node-data"\n', "data_dir 'ctp-node-data' is relative: give an absolute path"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/ctp-node.toml")


def test_config_command_prints_valid_toml(tmp_path, monkeypatch):
    monkeypatch.delenv("CTP_NODE_CONFIG", raising=False)
    monkeypatch.setenv("CTP_NODE_SERIES__QUIET_PERIOD_S", "15")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.output)
    assert data["series"]["quiet_period_s"] == 15
    assert data["jobs"]["database_url"].startswith("sqlite:///")
    # what it prints is itself a valid configuration file
    path = write(tmp_path, result.output)
    assert runner.invoke(app, ["config", "--check", "-c", str(path)]).exit_code == 0


def test_config_check_reports_errors(tmp_path):
    result = runner.invoke(app, ["config", "--check", "-c", str(write(tmp_path, "[dicom]\nport = 0\n"))])
    assert result.exit_code == 2
    assert "port" in result.output


def test_a_relative_data_folder_from_the_environment_is_refused(monkeypatch):
    monkeypatch.delenv("CTP_NODE_CONFIG", raising=False)
    monkeypatch.setenv("CTP_NODE_STORAGE__DATA_DIR", "data")
    with pytest.raises(ConfigError, match="is relative"):
        load_settings()


@pytest.mark.parametrize("order", [["--check", "FILE"], ["FILE", "--check"], ["-c", "FILE", "--check"]])
def test_config_check_file_as_the_readme_writes_it(tmp_path, monkeypatch, order):
    monkeypatch.delenv("CTP_NODE_CONFIG", raising=False)
    good, bad = write(tmp_path, "[dicom]\nport = 11200\n"), tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 0\n")
    ok = runner.invoke(app, ["config", *[str(good) if a == "FILE" else a for a in order]])
    assert ok.exit_code == 0 and "configuration valid" in ok.output and str(good) in ok.output
    refused = runner.invoke(app, ["config", *[str(bad) if a == "FILE" else a for a in order]])
    assert refused.exit_code == 2 and "port" in refused.output
