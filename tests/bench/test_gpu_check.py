"""bench/gpu_check.sh cannot lose or flatter its results: it survives injected failures (each a
FAIL line, the rest measured, the table last, exit status 1), and its JSON is written after
every section, so a run killed midway keeps what it measured. --quick, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # two CPU runs of the script, ~40 s on 2 shared cores

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args, timeout=600):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    for name in ("TRITON_INTERPRET", "CULTURE_NEURONS_KERNEL"):  # the script sets its own
        env.pop(name, None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    path = tmp_path / "gpu_check.json"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_injected_failures_leave_the_rest_and_the_table(tmp_path):
    proc, out = _run(tmp_path, "--reps", "1", "--skip", "tests", "--inject-fail",
                     "check:gelu_saturation,setup:model,provider:fused_record")
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = {c["name"] for c in out["checks"] if c["status"] == "FAIL"}
    assert {"check:gelu_saturation", "setup:model"} <= failed
    assert any(name.endswith(" fused_record") for name in failed)
    passed = {c["name"] for c in out["checks"] if c["status"] == "PASS"}
    assert "kernel path" in passed and any(n.startswith("act_and_record 7x33") for n in passed)
    rows = {(r["case"], r["provider"]): r for r in out["timings"]}
    # The MLP stack still ran every provider but the failing one, with spread and ratios.
    mlp = [r for (case, _), r in rows.items() if case.startswith("mlp 1L")]
    assert {r["provider"] for r in mlp if "ms" in r} == {"plain", "hooks", "fused_ablate",
                                                         "masked_gemm"}
    assert all("iqr_pct" in r for r in mlp if "ms" in r)
    assert all("ratio" in r for r in mlp if "ms" in r and r["provider"] != "plain")
    assert any(case.startswith("op x") for case, _ in rows)  # the decode-size op case ran
    assert out["sections"]["mlp"]["state"] == "done"
    # The table comes last: its header, then only its rows.
    lines = proc.stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("case "))
    assert len(lines) - header - 1 == len(out["timings"])


def test_a_killed_run_keeps_its_sections(tmp_path):
    proc, out = _run(tmp_path, "--inject-fail", "kill:checks")
    assert proc.returncode == 137
    assert "partial results in" in proc.stdout
    assert set(out["sections"]) == {"kernel_path", "checks"}
    assert any(c["name"].startswith("act_and_record") for c in out["checks"])
