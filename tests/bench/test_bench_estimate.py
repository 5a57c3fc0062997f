"""bench/bench_estimate.py on the tiny Llama (LM task): the JSON fields the issue names, and an
estimate that follows the exact matrix where the first order holds (tiny random sets)."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faker")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_estimate  # noqa: E402  (bench/bench_estimate.py)

FIELDS = {"model", "method", "pearson", "spearman", "gap_exact", "gap_estimate", "exact_s",
          "estimate_s", "speedup", "spearman_diag", "gap_rank_exact", "gap_rank_estimate"}  # fmt: skip


def test_compare_and_probe_on_the_tiny_llama():
    name, model, processor, data, config = bench_estimate.quick_cases()[1]
    cases, info = bench_estimate.compare(name, model, processor, data, config)
    assert {c["method"] for c in cases} == {"cas", "lap", "lape", "mad"}
    for case in cases:
        assert FIELDS <= set(case) and case["measure"] == "delta"
        assert case["speedup"] > 0 and case["exact_s"] > 0
        # 5 % of 3 x 192 neurons per culture: small sets, the first order holds (measured
        # r > 0.999; 0.9 leaves room for another BLAS)
        assert case["pearson"] > 0.9, case
    assert info["conditions"] == 1 + 4 * 3
    evaluation = data.split(config.split_ratio, config.seed)[1]
    items = [evaluation.items_by_culture[c][0] for c in evaluation.cultures]
    found = bench_estimate.probe(model, processor, items, "lm")
    assert [r["neurons"] for r in found["by_size"]] == [1, 10, 100]  # sizes up to half the neurons
    assert len(found["by_layer"]) == 3
    assert found["by_size"][0]["pearson"] > 0.99  # one neuron: first order all but exact
    assert "| cas | delta |" in bench_estimate.table(cases, [{**info, **found}])


def test_spearman_averages_ties():
    x = np.array([1.0, 2.0, 2.0, 3.0])
    assert bench_estimate.spearman(x, x) == pytest.approx(1.0)
    assert bench_estimate.spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(bench_estimate.spearman(np.ones(4), x))


def _share(self_: float, cross: float, C: int, sign: int) -> float:
    """The oriented specificity, written out: harm on the own culture over all harm."""
    total = sign * (self_ + (C - 1) * cross)
    return float("nan") if total <= 1e-12 else min(1.0, max(0.0, sign * self_ / total))


@pytest.mark.slow
def test_specificity_is_oriented_by_harm_on_the_tiny_vlm():
    """Accuracy deltas are harm when negative: their specificity uses sign -1 (flips +1)."""
    name, model, processor, data, config = bench_estimate.quick_cases()[0]
    cases, _ = bench_estimate.compare(name, model, processor, data, config)
    C = 3
    for case in cases:
        sign = -1 if case["measure"] == "delta" else 1
        for k in ("exact", "estimate"):
            want = _share(case[f"self_{k}"], case[f"cross_{k}"], C, sign)
            got = case[f"specificity_{k}"]
            assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want), (case, k)
