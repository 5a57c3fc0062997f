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


def test_the_median_interval_covers_a_known_median_95_percent_of_the_time():
    """Coverage and power by simulation with a known truth: ratios drawn from a log-normal
    around 1.03 (its median known exactly, spread 5 %, like a small model's pairs), 2000 runs
    each of 60 and of 300 pairs. The order-statistic interval must cover the true median in
    93-97 % of runs (neither too narrow nor too wide), and with 300 pairs it must tell 1.03
    from the 1.05 target: its upper end below 1.05 in at least 99 % of runs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    true_median = 1.03
    for n in (60, 300):
        covered, below_target = 0, 0
        for _ in range(2000):
            ratios = (true_median * torch.exp(0.05 * torch.randn(n, generator=gen))).tolist()
            lo, hi = bench_record.summary(ratios)["ci95"]
            covered += lo <= true_median <= hi
            below_target += hi < 1.05
        assert 0.93 <= covered / 2000 <= 0.97, (n, covered / 2000)
        if n == 300:
            assert below_target / 2000 >= 0.99, below_target / 2000
