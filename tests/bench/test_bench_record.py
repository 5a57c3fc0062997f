"""bench/bench_record.py on one tiny model: the providers asked for (plain always) run, each
one's per-forward time, first forward after attach, paired ratio and peak land in the JSON, and an unknown
provider is refused by name."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_record  # noqa: E402  (bench/bench_record.py)


@pytest.mark.slow  # four providers, three rounds of two forwards each and a peak
def test_chosen_providers_write_their_times_first_forwards_and_peaks(tmp_path):
    out = tmp_path / "record.json"
    bench_record.main(["--case", "tiny-qwen2_vl", "--providers", "hand_hooks,hooks,fused",
                       "--repeats", "1", "--pairs", "3", "--json", str(out)])  # fmt: skip
    (case,) = json.loads(out.read_text())["cases"]
    assert case["case"] == "tiny-qwen2_vl"
    names = ("plain", "hand_hooks", "hooks", "fused")
    assert set(case["peak_mib"]) == set(names)
    for name in names:
        assert case[f"{name}_s"] > 0 and case[f"{name}_first_s"] > 0
    assert case["hooks_over_plain"] == case["hooks_s"] / case["plain_s"]
    assert case["fused_over_hand_hooks"] == case["fused_s"] / case["hand_hooks_s"]
    assert "store_s" not in case and "functional_s" not in case
    for name in names[1:]:  # paired against plain on a twin: 3 ratios, their median and quartiles
        pair = case[f"{name}_paired"]
        lo, hi = pair["quartiles"]
        assert pair["pairs"] == 3 and 0 < lo <= pair["over_plain"] <= hi
        assert pair["ci95"] is None  # 3 pairs are too few for an interval
    assert "plain_paired" not in case


def test_an_unknown_provider_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_record.main(["--providers", "hooks,hook"])
    assert "unknown providers ['hook']" in capsys.readouterr().err


def test_the_paired_summary_takes_the_median_and_its_order_statistic_interval():
    """Against values worked out here: 100 ratios 1.00, 1.01, ..., 1.99; the median 1.495,
    k = floor((100 - 1.96 * 10) / 2) = 40, so the interval is [r[40], r[59]] = [1.40, 1.59]."""
    ratios = [1 + i / 100 for i in range(100)][::-1]  # order does not matter
    got = bench_record.summary(ratios)
    assert got["pairs"] == 100 and got["over_plain"] == pytest.approx(1.495)
    assert got["ci95"] == pytest.approx([1.40, 1.59])
    lo, hi = got["quartiles"]
    assert lo == pytest.approx(1.2425) and hi == pytest.approx(1.7475)
