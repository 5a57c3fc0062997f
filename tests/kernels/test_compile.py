"""The Triton kernels compile to PTX and cubin for Ampere (sm_80) and Hopper (sm_90) without a
GPU, and the production tiles do not spill.

``triton.compile`` needs real ``JITFunction``s, but tests/conftest.py turns the interpreter on
(which swaps them for interpreted ones) before anything imports triton. So the compiles run once
in a subprocess, ``bench/compile_report.py`` (which turns the interpreter off), whose rows carry
each variant's ptxas numbers (registers, spill bytes) and occupancy, or its error. Arguments are
typed as the launchers pass them on a GPU (pointers and strides divisible by 16, unit column
strides specialised to 1).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
# ~40 s of fresh compiles on 2 shared cores: deselect with -m "not slow".
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the table: registers, spills and occupancy per config (pytest -s)
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_variant_compiles_for_sm80_and_sm90(rows):
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"act_record", "masked_down"}
    failed = {f"{r['kernel']} {r['arch']} {r['variant']}": r["error"] for r in rows
              if "error" in r}
    assert not failed, failed


def test_production_tiles_do_not_spill(rows):
    """A spill at the tile the launcher picks would put local-memory traffic in every tile:
    change the tile (kernels/act_record.py TILES) or the kernel, not this test."""
    kernel_rows = [r for r in rows if r["kernel"] == "act_record" and "error" not in r]
    assert kernel_rows
    table = "\n".join(f"{r['arch']} {r['tile']} {r['variant']}: {r['regs']} registers, "
                      f"{r['spill_bytes']} spill bytes, {r['ctas_per_sm']} CTAs/SM "
                      f"({r['occupancy']:.0%} occupancy)" for r in kernel_rows)
    print(table)
    spilled = [r for r in kernel_rows if r["spill_bytes"]]
    assert not spilled, f"register spills in production tiles:\n{table}"
