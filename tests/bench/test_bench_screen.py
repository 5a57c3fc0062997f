"""bench/bench_screen.py on the tiny Llama (LM task): the JSON fields the issue names, screen's
conclusions equal to exact's, and the cost counted against a plain count of cells."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("faker")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_screen  # noqa: E402  (bench/bench_screen.py)

from culture_neurons.pipeline import screen  # noqa: E402
from culture_neurons.pipeline.config import SCREEN_BUDGET  # noqa: E402

FIELDS = {"model", "rule", "exact_s", "screen_s", "verdicts_differ", "max_ci_ratio",
          "ranking_agrees", "verdicts_differ_by_measure", "exact_prefills", "screen_prefills",
          "estimated_items", "prefill_ratio", "drift", "rounds"}  # fmt: skip


@pytest.mark.slow
def test_quick_bench_on_the_tiny_llama():
    name, model, processor, data, config = bench_screen.quick_cases()[1]
    rows = bench_screen.measure(name, model, processor, data, config, ["screen", "first_cells"])
    assert [r["rule"] for r in rows] == ["screen", "first_cells"]
    evaluation = data.split(config.split_ratio, config.seed)[1]
    per_culture = [len(evaluation.items_by_culture[c]) for c in evaluation.cultures]
    n, C = sum(per_culture), len(per_culture)
    for row in rows:
        assert FIELDS <= set(row)
        assert isinstance(row["verdicts_differ"], int) and row["max_ci_ratio"] >= 0
        masks = row["masks"]  # cas and lap (same sizes) and their one shared RND draw
        assert masks == 3 and row["conditions"] == 1 + C * masks
        assert row["exact_prefills"] == n * row["conditions"]
        assert row["estimated_items"] == n
        assert row["cap_exact_methods"] == pytest.approx((1 + C * 3) / (1 + C * 2))  # cas, lap
        for d in row["drift"]:  # the most-off cell is off by at least the sum's factor
            r, w = d["ratio"], d["worst_cell"]
            assert w is None or (r is not None and w >= max(r, 1 / r) - 1e-9), d
    screened, first = rows
    assert screened["verdicts_differ"] == 0 and screened["ranking_agrees"]
    # first cells only: the diagonal and SCREEN_BUDGET off-diagonal cells of every mask
    # (equal cultures: any SCREEN_BUDGET of them), plus the full model
    assert len(set(per_culture)) == 1
    assert first["screen_prefills"] == n + masks * (C + min(SCREEN_BUDGET, C * (C - 1))) * \
        per_culture[0]
    assert first["rounds"][0]["unsettled"] == {}  # one fill: nothing to disagree with
    assert screen.DRIFT_LIMIT == bench_screen.RULES["screen"][0]  # the rules restored
    assert "| screen |" in bench_screen.table(rows)


def test_ranking_orders_methods_by_their_primary_gap_direction():
    base = {"measures": ["accuracy_delta"], "direction": {"gap": "lower"}}
    res = {"a": {**base, "gap": -1.0}, "b": {**base, "gap": -3.0}, "c": {**base, "gap": None}}
    assert bench_screen.ranking(res) == ["b", "a", "c"]
    up = {"measures": ["nll_delta"], "direction": {"gap": "higher"}}
    res = {"a": {**up, "gap": 0.1}, "b": {**up, "gap": 0.3}}
    assert bench_screen.ranking(res) == ["b", "a"]


def test_compare_counts_differing_verdicts_and_the_largest_move():
    def ev(p, gap):
        return {"measures": ["nll_delta"], "primary": {"p_adj": p}, "p_gap_vs_rnd": p,
                "p_specificity_vs_rnd": 0.5, "gap": gap, "gap_ci": [0.0, 0.4],
                "specificity": 0.3, "direction": {"gap": "higher"}}  # fmt: skip

    exact = {"cas": ev(0.01, 0.2), "mad": ev(0.2, 0.1)}
    got = bench_screen.compare(exact, {"cas": ev(0.07, 0.5), "mad": ev(0.2, 0.1)})
    assert got["verdicts_differ"] == 2  # primary and p_gap of cas
    assert got["verdicts_differ_by_measure"] == {"primary": 1, "p_gap_vs_rnd": 1}
    assert got["max_ci_ratio"] == pytest.approx(0.3 / 0.2)
    assert got["ranking_agrees"] is True  # cas above mad both ways


def test_first_cultures_keeps_the_first_k_cultures_items_as_they_are():
    from culture_neurons.data import make_synthetic_items

    data = make_synthetic_items(cultures=5, items_per_culture=3, seed=4)
    got = bench_screen.first_cultures(data, 3)
    assert got.cultures == data.cultures[:3]
    assert list(got) == [it for c in data.cultures[:3] for it in data.items_by_culture[c]]
    assert got.labels_available == data.labels_available
    for k in (1, 6):
        with pytest.raises(SystemExit, match="2 to 5"):
            bench_screen.first_cultures(data, k)


@pytest.mark.slow
def test_replicated_verdicts_count_what_each_replicate_changes(tmp_path):
    """Exact's own yardstick: per replicate, the verdicts that differ from exact's, counted by
    hand from each replicate's recomputed tests (same draws)."""
    import copy

    import torch

    from culture_neurons.pipeline.retest import load_items, retest_items
    from culture_neurons.pipeline.run import Run
    from culture_neurons.scoring.uncertainty import Bootstrap

    name, model, processor, data, config = bench_screen.quick_cases()[0]  # the tiny Qwen2.5-VL
    run = Run(model, processor, data, tmp_path / "exact", config, progress=False)
    exact = run.evaluate(run.select(run.identify()))
    got = bench_screen.replicated_verdicts(run.out, exact, 6, seed=3)
    items, counts = load_items(run.out), []
    culture = items["culture"]
    C = len(data.cultures)
    # the same draws, each culture's items with replacement (Bootstrap.draw with seed 3)
    index = Bootstrap.draw(culture, C, 6, seed=3).index
    for columns in index:
        assert torch.equal(torch.bincount(culture[columns], minlength=C),
                           torch.bincount(culture, minlength=C))  # fmt: skip
        again = copy.deepcopy(exact)
        retest_items(items, again, columns)
        counts.append(sum(screen.conclusions(again[m])[k] != v for m in exact
                          for k, v in screen.conclusions(exact[m]).items()))  # fmt: skip
    assert got["replicates"] == 6 and got["max"] == max(counts)
    assert got["mean"] == pytest.approx(sum(counts) / 6)
    assert got["all_same"] == pytest.approx(counts.count(0) / 6)
    assert sum(got["by_verdict"].values()) == sum(counts) > 0  # some replicate changes one
