#!/usr/bin/env bash
# Remove pynetdicom's example apps from a virtualenv's bin/ (default: ./.venv).
#
# Why: pynetdicom installs them as console scripts named like DCMTK's tools (storescu, echoscu,
# storescp, findscu, getscu, movescu; also echoscp, qrscp). With the venv on PATH (activated, or
# .venv/bin first) they shadow DCMTK's, and the README's DCMTK lines fail with pynetdicom's argument
# errors (`storescu +sd +r ...`: "argument port: invalid int value: '+r'"). The node and its tests
# never run them; they stay available as `python -m pynetdicom storescu ...`.
# scripts/install.sh runs this after every install (pip puts them back on each reinstall).
set -euo pipefail
venv="${1:-.venv}"
bin="$venv/bin"
apps=$("$bin/python" -c '
from importlib.metadata import PackageNotFoundError, distribution
try:
    print(" ".join(ep.name for ep in distribution("pynetdicom").entry_points if ep.group == "console_scripts"))
except PackageNotFoundError:
    pass
')
removed=()
for app in $apps; do
  # Only pynetdicom's own launcher: a file of that name put there by anything else stays.
  if [ -f "$bin/$app" ] && grep -q "pynetdicom" "$bin/$app"; then
    rm -f "$bin/$app"
    removed+=("$app")
  fi
done
if [ ${#removed[@]} -gt 0 ]; then
  echo "removed pynetdicom's ${removed[*]} from $bin (they shadow DCMTK's; use python -m pynetdicom)"
fi
