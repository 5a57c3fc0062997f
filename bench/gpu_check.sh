#!/usr/bin/env bash
# One prepared GPU check of the kernels (bf16 correctness, then timings at 7B decoder shapes).
#   bash bench/gpu_check.sh            on a CUDA machine: < 8 minutes, table printed last
#   bash bench/gpu_check.sh --quick    anywhere: tiny shapes on the CPU, tests the plumbing
# Extra arguments go to bench/gpu_check.py (--json PATH, --providers a,b, --budget-s S).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
unset TRITON_INTERPRET  # real kernels on the GPU; --quick never imports the Triton kernels
# The script stops starting work after --budget-s (420 s by default); the hard guard below
# ends it at 470 s whatever happens (a hung compile, a stuck launch), within the 8 minutes.
timeout --signal=TERM --kill-after=10 470 "$PYTHON" -u bench/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAIL gpu_check: killed by the 470 s guard (rc $rc)"
fi
exit "$rc"
