#!/usr/bin/env bash
# Install ctp-node into ./.venv on a fresh machine (Python >= 3.10 with venv).
# torch is pinned first so pip takes the CPU wheel this project is tested with; on a GPU server
# install the CUDA build of torch into the venv before running this script and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# pynetdicom's example apps (storescu, echoscu, ...) would shadow DCMTK's once .venv/bin is on PATH.
bash scripts/remove-pynetdicom-apps.sh .venv
echo "installed: $(.venv/bin/ctp-node --version)"
