"""pynetdicom's example apps must not shadow DCMTK's in the venv (issue 25): with .venv/bin on PATH,
the README's `storescu +sd +r ...` ran pynetdicom's storescu ("argument port: invalid int value")."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "remove-pynetdicom-apps.sh"
SYSTEM_PATH = ["/usr/local/bin", "/usr/bin", "/bin"]  # where DCMTK's tools are (Debian: /usr/bin)


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _pip_launcher(module: str) -> str:
    """A console script as pip writes it."""
    return (
        f"#!{sys.executable}\nimport sys\nfrom {module} import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )


def test_the_venv_bin_on_path_finds_dcmtk_not_pynetdicom(tmp_path):
    venv = tmp_path / "venv"
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    _executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    apps = {ep.name: ep.value for ep in distribution("pynetdicom").entry_points if ep.group == "console_scripts"}
    assert {"storescu", "echoscu", "storescp"} <= set(apps)
    for name, target in apps.items():
        _executable(bin_dir / name, _pip_launcher(target.split(":")[0]))
    _executable(bin_dir / "ctp-node", _pip_launcher("ctp_node.cli.main"))  # the venv's own: kept
    # The venv first, then the system's folders (not this test run's PATH: its own venv may still
    # hold pynetdicom's apps, which is what the script is for).
    path = os.pathsep.join([str(bin_dir), *SYSTEM_PATH])
    assert shutil.which("storescu", path=path) == str(bin_dir / "storescu")  # the shadowing, as installed

    done = subprocess.run(["bash", str(SCRIPT), str(venv)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in apps:
        assert not (bin_dir / name).exists(), f"pynetdicom's {name} still in the venv"
    assert (bin_dir / "ctp-node").exists() and (bin_dir / "python").exists()
    for tool in ("storescu", "echoscu", "storescp"):
        found = shutil.which(tool, path=path)
        assert found is None or Path(found).parent != bin_dir, tool
    real = shutil.which("storescu", path=os.pathsep.join(SYSTEM_PATH))
    if real is not None:  # DCMTK installed: the README's options reach it
        assert shutil.which("storescu", path=path) == real
        version = subprocess.run(
            ["storescu", "--version"], capture_output=True, text=True, timeout=30, env={**os.environ, "PATH": path}
        )
        assert "dcmtk" in (version.stdout + version.stderr).lower()
    assert subprocess.run(["bash", str(SCRIPT), str(venv)], capture_output=True, timeout=60).returncode == 0  # again


def test_a_file_of_that_name_from_elsewhere_stays(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    _executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    _executable(bin_dir / "storescu", '#!/bin/sh\nexec /usr/bin/storescu "$@"\n')  # a site's own wrapper
    subprocess.run(["bash", str(SCRIPT), str(tmp_path / "venv")], check=True, capture_output=True, timeout=60)
    assert (bin_dir / "storescu").exists()


def test_the_install_script_removes_them_after_installing():
    lines = (REPO / "scripts" / "install.sh").read_text().splitlines()
    install = max(i for i, line in enumerate(lines) if "pip install" in line and "-e" in line)
    remove = next(i for i, line in enumerate(lines) if "remove-pynetdicom-apps.sh" in line and not line.startswith("#"))
    assert remove > install


def test_the_readme_says_whose_storescu_it_means():
    readme = (REPO / "README.md").read_text()
    assert "storescu -xs +sd +r" in readme and "scripts/remove-pynetdicom-apps.sh" in readme
    assert "/usr/bin/storescu" in readme and "python -m pynetdicom storescu" in readme
