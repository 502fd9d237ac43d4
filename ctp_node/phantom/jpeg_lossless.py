"""JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1) via DCMTK's dcmcjpeg.

Real CTP arrives in this transfer syntax (1.2.840.10008.1.2.4.70), but neither pydicom nor
pylibjpeg can encode it. DCMTK's ``dcmcjpeg`` is the mature encoder (it is already a test
dependency for its network tools, and python-gdcm would add a large binary wheel for one codec);
it keeps the SOP Instance UID (``+un``) because the compression is lossless.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


class EncoderMissingError(RuntimeError):
    """The external JPEG Lossless encoder is not installed."""


def dcmcjpeg_path() -> str:
    """Path of dcmcjpeg, or EncoderMissingError saying how to install it."""
    path = shutil.which("dcmcjpeg")
    if path is None:
        raise EncoderMissingError(
            "JPEG Lossless SV1 needs DCMTK's dcmcjpeg, which is not on PATH: install it "
            "(Debian/Ubuntu: apt-get install dcmtk; macOS: brew install dcmtk) or choose "
            "--transfer-syntax explicit or rle"
        )
    return path


def compress_in_place(path: Path) -> None:
    """Re-encode one Explicit VR Little Endian file as JPEG Lossless SV1 (all frames)."""
    encoder = dcmcjpeg_path()
    tmp = path.with_name(path.name + ".jpeg.tmp")
    result = subprocess.run([encoder, "+e1", "+un", str(path), str(tmp)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"dcmcjpeg failed on {path} (exit {result.returncode}): {result.stderr.strip()}")
    tmp.replace(path)
