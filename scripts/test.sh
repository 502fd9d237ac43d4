#!/usr/bin/env bash
# Install ctp-node and run the whole test suite (lint, unit and integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The Compose Specification schema for tests/deploy (npm registry over HTTPS, checksum-pinned);
# offline, that one check is skipped and says so (CI: fails, CTP_NODE_DEPLOY_CHECKS=required).
bash tests/deploy/fetch-compose-schema.sh || echo "note: compose schema not fetched (no access to registry.npmjs.org?)"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=30 "$@"
