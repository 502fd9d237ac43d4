#!/usr/bin/env bash
# Install ctp-node and run the whole test suite (lint, unit and integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
