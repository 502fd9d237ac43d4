"""benchmarks/turnaround.py is a measurement, not a test; this only checks that it starts."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "turnaround.py"


def test_turnaround_benchmark_describes_itself():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "first byte sent" in result.stdout and "--repeats" in result.stdout


def test_turnaround_benchmark_rejects_unknown_options():
    result = subprocess.run([sys.executable, str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
