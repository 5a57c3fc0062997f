"""bench/bench_width.py --quick: the same code as the 7B-width rehearsal at 1/32 of the widths.
Every provider runs on both models, the JSON carries the fields issue #24 names, and the
budgeted case has fewer image tokens than the processor's default, within its budget."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_width  # noqa: E402  (bench/bench_width.py)

FIELDS = {"hidden", "intermediate", "image_tokens", "plain_s", "auto_s", "hooks_s",
          "functional_s", "peak_mib", "estimate_s", "estimate_peak_mib"}  # fmt: skip

pytestmark = pytest.mark.slow  # two models, six providers, two image settings: ~1 min


def test_quick_rehearsal_writes_every_field(tmp_path):
    out = tmp_path / "width.json"
    bench_width.main(["--quick", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert [c["model"] for c in cases] == [m for m in bench_width.MODELS for _ in range(2)]
    for case in cases:
        assert FIELDS <= set(case), sorted(FIELDS - set(case))
        assert set(case["peak_mib"]) >= {"plain", "auto", "hooks", "functional"}
        assert all(case[f"{p}_s"] > 0 for p in ("plain", "auto", "hooks", "functional"))
    for default, budgeted in zip(cases[::2], cases[1::2], strict=True):
        limit = budgeted["budget"]["max_image_tokens"]
        assert budgeted["image_tokens"] <= limit < default["image_tokens"]
        spec = bench_width.MODELS[default["model"]]["text"]
        assert default["hidden"] == spec["hidden_size"] // bench_width.QUICK
        assert default["intermediate"] == spec["intermediate_size"] // bench_width.QUICK
