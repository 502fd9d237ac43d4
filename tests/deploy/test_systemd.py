"""deploy/systemd units: the expected keys (parsed as INI), and systemd's own verifier and
exposure score where systemd-analyze is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ctp_node.config import OPEN_FILES_LIMIT, Settings, open_files_needed, open_files_warning
from tests.deploy.tools import DEPLOY, need_program

UNITS = DEPLOY / "systemd"
RECEIVER = UNITS / "ctp-node.service"
WORKER = UNITS / "ctp-node-worker@.service"
BINARY = "/opt/ctp-node/bin/ctp-node"
SYSTEMD_INSTALL = "apt-get install -y systemd"


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys repeat, e.g. Environment=).

    The unit file syntax used here: [Section] headers, Key=Value lines, # and ; comments; a line
    outside a section, without "=", or continued with a backslash is refused.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: no continuation lines"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: not Key=Value: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module", params=[RECEIVER, WORKER], ids=["receiver", "worker"])
def unit(request):
    return request.param, parse(request.param)


def one(unit_sections, section, key) -> str:
    values = unit_sections[section][key]
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


def test_hardening_baseline(unit):
    path, sections = unit
    service = sections["Service"]
    expected = {
        "User": "ctp-node",
        "Group": "ctp-node",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ReadWritePaths": "/var/lib/ctp-node",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/ctp-node/ctp-node.env",
        "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert one(sections, "Service", key) == value, f"{path.name}: {key}"
    assert "CTP_NODE_CONFIG=/etc/ctp-node/ctp-node.toml" in service["Environment"]
    assert re.fullmatch(r"\d+s", one(sections, "Service", "RestartSec"))
    assert int(one(sections, "Unit", "StartLimitBurst")) >= 1 and one(sections, "Unit", "StartLimitIntervalSec")
    assert one(sections, "Install", "WantedBy") == "multi-user.target"
    assert one(sections, "Service", "ExecStartPre") == f"{BINARY} config --check"


def test_receiver_command_and_devices():
    sections = parse(RECEIVER)
    assert one(sections, "Service", "ExecStart") == f"{BINARY} serve --log-format json"
    assert one(sections, "Service", "PrivateDevices") == "yes", "the receiver needs no device"


def test_worker_gets_its_gpu():
    sections = parse(WORKER)
    # Each instance serves its metrics on its own port (GPU 0: 9110, GPU 1: 9111, ...).
    assert one(sections, "Service", "ExecStart") == (
        f"{BINARY} worker --device cuda:%i --metrics-port 911%i --log-format json"
    )
    assert one(sections, "Service", "PrivateDevices") == "no"
    assert one(sections, "Service", "DevicePolicy") == "closed"
    assert sections["Service"]["DeviceAllow"] == ["char-nvidia* rw"]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in sections["Service"]["Environment"]
    # SIGTERM lets the worker finish its series: the stop timeout must allow for one.
    assert re.fullmatch(r"\d+min", one(sections, "Service", "TimeoutStopSec"))
    assert "MemoryDenyWriteExecute" not in sections["Service"], "CUDA/Triton JIT need W+X memory"


def test_open_files_limit_is_stated_and_fits_the_caps(unit):
    """Issue 23: 1,100 stalled HTTP connections used up an unstated 1,024 and broke DICOM too. The limit
    is stated (a host's default may differ), is no more than select() in pynetdicom can poll, and the
    node's caps with the defaults need less (ctp_node.config.open_files_needed)."""
    path, sections = unit
    limit = int(one(sections, "Service", "LimitNOFILE"))
    assert limit == OPEN_FILES_LIMIT <= 1024, path.name
    everything_on = Settings(web={"enabled": True, "token": {"env": "CTP_NODE_WEB_TOKEN"}})
    assert open_files_needed(everything_on) <= limit
    assert open_files_warning(everything_on, limit) is None
    too_many = Settings(dicom={"max_associations": 400})
    assert "max_associations = 400" in open_files_warning(too_many, limit)


def _runnable_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at a stub, since verify checks that the binary exists."""
    stub = tmp_path / "ctp-node"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for path, instance in ((RECEIVER, RECEIVER.name), (WORKER, "ctp-node-worker@0.service")):
        copy = tmp_path / instance
        copy.write_text(path.read_text().replace(BINARY, str(stub)))
        copies.append(copy)
    return copies


def test_systemd_analyze_verify(tmp_path):
    analyze = need_program("systemd-analyze", SYSTEMD_INSTALL)
    units = _runnable_copies(tmp_path)
    run = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; any message at all is a finding.
    assert run.returncode == 0 and not (run.stdout + run.stderr).strip(), run.stdout + run.stderr


def test_verify_check_can_fail(tmp_path):
    analyze = need_program("systemd-analyze", SYSTEMD_INSTALL)
    (unit, _) = _runnable_copies(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomee=yes"))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in run.stdout + run.stderr


def test_exposure_score(tmp_path):
    """systemd's own hardening score (0 = locked down, 10 = unprotected); 'OK' ends below 4."""
    analyze = need_program("systemd-analyze", SYSTEMD_INSTALL)
    for unit in _runnable_copies(tmp_path):
        run = subprocess.run(
            [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
        )
        if "--offline" in run.stderr and "unrecognized" in run.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd >= 250")
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
        assert score, run.stdout[-500:] + run.stderr
        assert float(score.group(1)) <= 2.5, f"{unit.name}: exposure {score.group(1)}"
