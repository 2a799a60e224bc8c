#!/usr/bin/env bash
# One GPU session in two calls (see scripts/gpu_session.py for the stages, their caps and the
# outputs). On the device machine, one after the other:
#   bash scripts/gpu_session.sh --call 1     # <= 7 min: build, smoke, headline benchmarks -> $OUT
#   bash scripts/gpu_session.sh --call 2     # <= 5 min: GPU test lane, sanitizers -> $OUT
# Other arguments pass through, e.g. --call 2 --stages build,backends,tests to rerun what failed.
set -u
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_session.py --device cuda ${OUT:+--out "$OUT"} "$@"
