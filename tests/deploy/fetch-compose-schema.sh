#!/usr/bin/env bash
# Fetch the Compose Specification JSON schema for tests/deploy/test_compose.py into
# tests/deploy/.cache/compose-spec.schema.json. Source: the npm package dclint (MIT), which ships the
# upstream compose-spec schema (Apache-2.0) as schemas/compose.schema.json. Pinned version and
# checksum: a changed file fails here instead of changing what the test checks.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=3.1.0
SHA256=46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496
cache=.cache
mkdir -p "$cache"
if [ -f "$cache/compose-spec.schema.json" ] && echo "$SHA256  $cache/compose-spec.schema.json" | sha256sum -c --quiet - 2>/dev/null; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
npm pack --silent --pack-destination "$work" "dclint@$VERSION" >/dev/null
tar -xzf "$work/dclint-$VERSION.tgz" -C "$work" package/schemas/compose.schema.json
echo "$SHA256  $work/package/schemas/compose.schema.json" | sha256sum -c --quiet -
mv "$work/package/schemas/compose.schema.json" "$cache/compose-spec.schema.json"
echo "compose schema: tests/deploy/$cache/compose-spec.schema.json (dclint $VERSION)"
