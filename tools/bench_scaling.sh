#!/usr/bin/env bash
# BENCHMARKS.md's "W=1 vs W=2" row (C12) in one command: W=1 vs W=2 (Ray, gloo) end to end with graph and
# random sharding, then the loader alone, on the generated 2e5-cell genome store (built first if missing:
# tools/bench_genome.py's build phase, ~80 s; the graphs are built on first use by the first run).
#
#     bash tools/bench_scaling.sh            # JSON lines on stdout, one per run (and per loader rank)
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 DS_ACCELERATOR=cpu RAY_AUTH_MODE=token
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
S=.bench/genome/genome_200000.zarr
C=(--coexpr-max-cells 200000)
PY=.venv/bin/python
$PY tools/bench_genome.py --sizes 200000 --phases build >&2
for args in "--workers 1" "--workers 2" "--workers 2 --sharding random"; do
    # shellcheck disable=SC2086
    $PY tools/bench_train.py $S $args --batch 32 --steps 30 --epochs 2 "${C[@]}" 2>/dev/null | grep '^{'
done
for args in "--workers 1" "--workers 2" "--workers 2 --sharding random"; do
    # shellcheck disable=SC2086
    $PY tools/bench_loader.py $S $args --steps 200 "${C[@]}" 2>/dev/null | grep '^{'
done
