#!/usr/bin/env bash
# One device run for a session that is lent an H100/H200 (see README "Benchmarks"): the engine's
# default fast path with torch.compile, the same without, and the published loop, all measured in
# the same run. Writes JSON and text to $OUT. About 6-8 minutes including compilation.
set -euo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -c "import typer, rich, scipy" 2>/dev/null || python3 -m pip install -q typer rich scipy
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export PYTHONPATH=$PWD
python3 -m ctp_node bench --compile -o "$OUT/bench_compile.json" 2>&1 | tee "$OUT/bench_compile.txt"
python3 -m ctp_node bench --no-compile --published-steps 5 -o "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.txt"
