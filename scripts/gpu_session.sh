#!/usr/bin/env bash
# One GPU session in one command (under 8 minutes): see scripts/gpu_session.py for the
# stages, their caps and the outputs. On the device machine:
#   bash scripts/gpu_session.sh            # writes to $OUT (default out/gpu-session-<date>-<time>)
# Arguments pass through, e.g. --stages tests,sanitizers to rerun what failed.
set -u
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_session.py --device cuda ${OUT:+--out "$OUT"} "$@"
