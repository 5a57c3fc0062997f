"""The run's tests from its kept per-item scores: ``report`` recomputes them without the model
(a change of test needs no evaluation), the same numbers ``evaluate`` wrote; the primary p is
Holm-adjusted across the methods (checked against a plain computation)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_cli_assets
from safetensors.torch import load_file

import culture_neurons as cn
from culture_neurons.pipeline import cli, retest

ARGS = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all", "--quiet",
        "--ratio", "0.05", "--rnd-draws", "2", "--methods", "cas,lap,mad"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("retest")
    assets = save_cli_assets(root, "qwen2_5_vl")
    out = root / "run"
    assert cli.main(["run", "--model", assets["model"], "--data", assets["data"], "--out",
                     str(out), *ARGS]) == 0  # fmt: skip
    return out


def _eval(out, m):
    return json.loads((out / "eval" / f"{m}.json").read_text())


def test_report_recomputes_the_tests_without_the_model(run_dir):
    before = {m: _eval(run_dir, m) for m in ("cas", "lap", "mad")}
    for m, ev in before.items():  # alter what a test wrote, as a change of test would
        tampered = dict(ev, p_gap_vs_rnd=0.5, p_gap_vs_rnd_adj=0.5, tests={}, delta_cell_q=None)
        (run_dir / "eval" / f"{m}.json").write_text(json.dumps(tampered))
    (run_dir / "report.md").unlink()
    assert cli.main(["report", "--out", str(run_dir)]) == 0
    for m, ev in before.items():
        after = _eval(run_dir, m)
        for key in ("p_gap_vs_rnd", "p_gap_vs_rnd_adj", "p_flip_gap_vs_rnd", "specificity",
                    "p_specificity_vs_rnd", "delta_cell_p", "delta_cell_q", "tests", "primary"):
            assert after[key] == ev[key], (m, key)
    assert (run_dir / "report.md").is_file()


def test_kept_scores_give_the_json_p_through_the_public_function(run_dir):
    items = load_file(str(run_dir / retest.ITEMS_FILE))
    culture, full, labels = items["culture"], items["full"], items["labels"]
    ev = _eval(run_dir, "cas")

    def change(name):  # accuracy points, written out again here
        pred = items[f"scores.{name}"]
        return 100.0 * ((pred == labels).double() - (full == labels).double())

    draws = torch.stack([change(d) for d in ev["rnd"]["masks"]])
    res = cn.compare_to_random(change("cas"), draws, culture, "gap", direction=-1,
                               seed=ev["bootstrap_seed"] % 2**32)  # fmt: skip
    assert res.p == ev["p_gap_vs_rnd"] and res.value == pytest.approx(ev["gap"], abs=1e-9)


def test_primary_p_is_holm_adjusted_across_methods(run_dir):
    evs = [_eval(run_dir, m) for m in ("cas", "lap", "mad")]
    assert {ev["primary"]["measure"] for ev in evs} == {"gap"}
    ps = [ev["p_gap_vs_rnd"] for ev in evs]
    order = sorted(range(3), key=lambda i: ps[i])
    expected, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):  # Holm by hand
        running = max(running, min(1.0, (3 - rank) * ps[i]))
        expected[i] = running
    assert [ev["p_gap_vs_rnd_adj"] for ev in evs] == pytest.approx(expected)
    assert all(ev["tests"]["flip_gap"]["role"] == retest.SECONDARY for ev in evs)
    assert all(ev["tests"]["gap"]["role"].startswith("primary") for ev in evs)


def test_retest_on_chosen_items_tests_those_items_alone(run_dir):
    """``retest_items`` on ``columns`` (repeats allowed: a bootstrap replicate) tests the run as if those items were
    its evaluation set: the p through the public function on the sliced changes, by hand."""
    items = load_file(str(run_dir / retest.ITEMS_FILE))
    culture, full, labels = items["culture"], items["full"], items["labels"]
    g = torch.Generator().manual_seed(5)
    own = [torch.nonzero(culture == c).flatten() for c in culture.unique().tolist()]
    cols = torch.cat([i[torch.randint(0, len(i), (len(i),), generator=g)] for i in own])
    assert len(cols.unique()) < len(cols)  # some item drawn twice
    results = {m: _eval(run_dir, m) for m in ("cas", "lap", "mad")}
    retest.retest_items(retest.load_items(run_dir), results, cols)
    ev = results["cas"]

    def change(name):  # accuracy points on the drawn items, written out again here
        pred = items[f"scores.{name}"][:, cols]
        return 100.0 * ((pred == labels[cols]).double() - (full[cols] == labels[cols]).double())

    draws = torch.stack([change(d) for d in ev["rnd"]["masks"]])
    seed = ev["bootstrap_seed"] % 2**32
    gap = cn.compare_to_random(change("cas"), draws, culture[cols], "gap", direction=-1,
                               seed=seed)  # fmt: skip
    spec = cn.compare_to_random(change("cas"), draws, culture[cols], "specificity",
                                direction=-1, seed=seed)  # fmt: skip
    assert ev["p_gap_vs_rnd"] == gap.p and ev["tests"]["gap"]["value"] == pytest.approx(gap.value)
    assert ev["p_specificity_vs_rnd"] == (None if spec.p != spec.p else spec.p)
    whole = _eval(run_dir, "cas")  # every item once: the JSON's own numbers
    again = {m: _eval(run_dir, m) for m in ("cas", "lap", "mad")}
    retest.retest_items(retest.load_items(run_dir), again, torch.arange(len(culture)))
    assert again["cas"]["p_gap_vs_rnd"] == whole["p_gap_vs_rnd"]
    assert again["cas"]["tests"] == whole["tests"]
