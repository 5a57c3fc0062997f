#!/usr/bin/env bash
# One prepared GPU check of the fused path: correctness, pytest -m gpu, interleaved timings of
# the real backend, decode-size calls, the MLP stack and a tile sweep; table printed last.
#   bash bench/gpu_check.sh            on a CUDA machine: < 8 minutes on an H100
#   bash bench/gpu_check.sh --quick    anywhere: tiny shapes on the CPU, tests the plumbing
# Results: $OUT/gpu_check.json when $OUT is set, else bench/gpu_check.json, rewritten after
# every section (a run that dies keeps what it measured). Installs nothing.
# Extra arguments go to bench/gpu_check.py (--budget-s S, --skip a,b, --reps N, --json PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The script stops starting work after --budget-s (420 s by default); the hard guard below
# ends it at 470 s whatever happens (a hung compile, a stuck launch), within the 8 minutes.
timeout --signal=TERM --kill-after=10 470 "$PYTHON" -u bench/gpu_check.py "$@"
rc=$?
json="${OUT:+$OUT/gpu_check.json}"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAIL gpu_check: ended early (rc $rc: the 470 s guard or a kill); partial results in ${json:-bench/gpu_check.json}"
fi
exit "$rc"
