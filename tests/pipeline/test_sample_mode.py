"""``--matrix sample`` (culture_neurons.scoring.sampled) against the exact matrix of the same
run: each set of culture s runs on every item of culture s and on a share of every culture's
items, chosen from the item ids and the run's seed; what it computes is exact's, what it does
not is the task's "not computed" score; its cells, tests and record follow from the kept
per-item scores, computed here by hand; it resumes, refuses a share under another mode, runs
on 2 gloo ranks and on merged shards to one process's numbers, and its report marks nothing as
estimated."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import save_cli_assets
from test_distributed import _two_ranks

import culture_neurons as cn
from culture_neurons.data import stable_seed
from culture_neurons.errors import UsageError
from culture_neurons.pipeline import cli, retest
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.scoring import sampled
from culture_neurons.scoring.multiplicity import cell_p

RECORD = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all", "--quiet"]
# ratio 0.3: sets large enough that the tiny model changes some answers under them
SELECT = ["--ratio", "0.3", "--rnd-draws", "1", "--methods", "cas,lap"]
SHARE = 0.3
SAMPLE = ["--matrix", "sample", "--sample-share", str(SHARE), "--quiet"]
NOT_COMPUTED = -2  # an MC score not computed (scoring.metrics.NOT_COMPUTED), written out here


# -- fixtures: one exact run and its sampled evaluation (one process, the command line) ---------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("sample_assets"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def assets(saved):
    """`record` arguments, every identification item."""
    return ["--model", saved["model"], "--data", saved["data"], *RECORD]


@pytest.fixture(scope="module")
def exact_run(assets, tmp_path_factory):
    """A finished exact run (one process)."""
    out = tmp_path_factory.mktemp("sample_exact") / "run"
    assert cli.main(["run", *assets, *SELECT, "--resamples", "50", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sample_run(exact_run, tmp_path_factory):
    """The exact run evaluated again with ``--matrix sample --sample-share 0.3``."""
    out = tmp_path_factory.mktemp("sample_sampled") / "run"
    shutil.copytree(exact_run, out)
    assert cli.main(["evaluate", "--out", str(out), *SAMPLE]) == 0
    return out


def _evals(out) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}


def _items(out) -> dict:
    return retest.load_items(out)


def _chosen_by_hand(ids: list[str], culture: torch.Tensor, C: int, share: float,
                    seed: int) -> torch.Tensor:  # fmt: skip
    """The share as the SPEC states it, written out again: per culture, the
    max(2, ceil(share * n_c)) items (all, if fewer) first when ordered by
    stable_seed("sample", seed, id)."""
    chosen = torch.zeros(len(ids), dtype=torch.bool)
    for c in range(C):
        members = [i for i in range(len(ids)) if int(culture[i]) == c]
        k = min(len(members), max(2, math.ceil(share * len(members))))
        for i in sorted(members, key=lambda i: stable_seed("sample", seed, ids[i]))[:k]:
            chosen[i] = True
    return chosen


def _computed_by_hand(chosen: torch.Tensor, culture: torch.Tensor, C: int) -> torch.Tensor:
    """bool [C, n] of one mask: row s (culture s's set) computes culture s's items and the
    share, nothing else."""
    out = torch.zeros(C, len(culture), dtype=torch.bool)
    for s in range(C):
        for i in range(len(culture)):
            out[s, i] = int(culture[i]) == s or bool(chosen[i])
    return out


def _share_of(out) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """(chosen [n], culture [n], C, item ids) of the run in ``out``, from full.json's ids and
    run.json's seed, through sampled.choose (checked against the hand-written rule)."""
    full = json.loads((out / "eval" / "full.json").read_text())
    seed = json.loads((out / "run.json").read_text())["config"]["seed"]
    culture = torch.tensor(full["culture"])
    C = int(culture.max()) + 1
    chosen = sampled.choose(full["items"], culture, C, SHARE, seed)
    assert torch.equal(chosen, _chosen_by_hand(full["items"], culture, C, SHARE, seed))
    return chosen, culture, C, full["items"]


# -- 1. sample equals exact where computed ------------------------------------------------------
def test_choose_is_the_seeded_share_whatever_the_item_order():
    """Per culture the first max(2, ceil(f n_c)) ids in stable_seed order, the same set of ids
    in any item order; another seed draws another share; a share outside (0, 1] is refused."""
    ids = [f"item-{k}" for k in range(23)]
    culture = torch.tensor([k % 3 for k in range(23)])  # 8, 8, 7 items
    chosen = sampled.choose(ids, culture, 3, 0.25, seed=4)
    assert torch.equal(chosen, _chosen_by_hand(ids, culture, 3, 0.25, seed=4))
    assert torch.bincount(culture[chosen], minlength=3).tolist() == [2, 2, 2]
    assert torch.bincount(culture[sampled.choose(ids, culture, 3, 0.5, 4)]).tolist() == [4, 4, 4]
    # rounded up: 0.3 x 8 = 2.4 and 0.3 x 7 = 2.1 items are 3
    assert torch.bincount(culture[sampled.choose(ids, culture, 3, 0.3, 4)]).tolist() == [3, 3, 3]
    assert torch.equal(
        sampled.choose(ids, culture, 3, 0.3, 4), _chosen_by_hand(ids, culture, 3, 0.3, 4)
    )
    assert bool(sampled.choose(ids, culture, 3, 1.0, 4).all())  # the whole share: every item
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = sampled.choose([ids[p] for p in perm], culture[perm], 3, 0.25, seed=4)
    assert {ids[p] for p, c in zip(perm, shuffled.tolist(), strict=True) if c} == {
        ids[i] for i in torch.nonzero(chosen).flatten().tolist()
    }
    others = [sampled.choose(ids, culture, 3, 0.25, seed=s) for s in range(5, 10)]
    assert any(not torch.equal(o, chosen) for o in others)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(UsageError, match="--sample-share"):
            sampled.choose(ids, culture, 3, bad, seed=4)


def test_a_share_of_a_whole_number_of_items_is_that_number():
    """7 % of 100 items is 7 items, 14 % of 50 is 7, 28 % of 25 is 7: not 8."""
    assert [sampled.sample_size(n, f) for n, f in ((100, 0.07), (50, 0.14), (25, 0.28))] == [7] * 3


def test_sample_equals_exact_where_computed(exact_run, sample_run):
    ex, sa = _items(exact_run), _items(sample_run)
    chosen, culture, C, ids = _share_of(sample_run)
    n = len(ids)
    assert torch.equal(sa["culture"], ex["culture"]) and torch.equal(sa["culture"], culture)
    assert torch.equal(sa["full"], ex["full"]) and torch.equal(sa["labels"], ex["labels"])
    names = [k.removeprefix("scores.") for k in ex if k.startswith("scores.")]
    assert sorted(names) == sorted(k.removeprefix("scores.") for k in sa if k.startswith("scores."))
    assert len(names) == 4  # cas, lap and one RND draw each
    # the share of this run: 2 of the 4 evaluation items of each culture
    assert torch.bincount(culture[chosen], minlength=C).tolist() == [2] * C
    want = _computed_by_hand(chosen, culture, C)
    assert want.sum() == C * (4 + 2 * (C - 1))  # per set: its own 4 and 2 of each other culture
    computed = 0
    for name in names:
        got, exact = sa[f"scores.{name}"], ex[f"scores.{name}"]
        assert got.shape == exact.shape == (C, n)
        assert torch.equal(got != NOT_COMPUTED, want), name  # exactly these entries computed
        assert torch.equal(got[want], exact[want]), name  # and exact's there, exactly
        assert bool((got[~want] == NOT_COMPUTED).all()), name
        computed += int(want.sum())
    S = C * len(names)
    full = json.loads((sample_run / "eval" / "full.json").read_text())
    assert full["matrix"] == "sample" and full["pred"] == sa["full"].tolist()
    for method in ("cas", "lap"):
        ev = json.loads((sample_run / "eval" / f"{method}.json").read_text())
        assert ev["matrix"] == "sample"
        rec = ev["sample"]
        assert rec["share"] == SHARE
        assert rec["seed"] == json.loads((sample_run / "run.json").read_text())["config"]["seed"]
        assert rec["sampled_per_culture"] == torch.bincount(culture[chosen], minlength=C).tolist()
        assert rec["items_per_culture"] == torch.bincount(culture, minlength=C).tolist()
        assert rec["prefills"] == n + computed == 12 + 4 * 3 * 8
        assert rec["exact_prefills"] == n * (1 + S) == 12 * 13
        assert "confirmed" not in ev and "estimate" not in ev
        assert (
            ev["accuracy_full"]
            == json.loads((exact_run / "eval" / f"{method}.json").read_text())["accuracy_full"]
        )


def test_a_share_covering_every_item_is_the_exact_run(exact_run, tmp_path):
    """At 0.99 of 4 items per culture every item is in the share: every set runs on every
    item, and every number (cells, intervals, tests) is the exact run's; only the mode and
    its record differ, and the prefills are exact's."""
    out = tmp_path / "run"
    shutil.copytree(exact_run, out)
    assert cli.main(["evaluate", "--out", str(out), "--matrix", "sample", "--sample-share",
                     "0.99", "--quiet"]) == 0  # fmt: skip
    _same_items(out, exact_run)
    a, b = _evals(out), _evals(exact_run)
    assert a.keys() == b.keys()
    for name in a:
        got = {k: v for k, v in a[name].items() if k not in ("matrix", "sample")}
        want = {k: v for k, v in b[name].items() if k != "matrix"}
        assert got == want, (name, [k for k in got if got[k] != want.get(k)])
        assert a[name]["matrix"] == "sample" and b[name]["matrix"] == "exact"
    rec = a["cas"]["sample"]
    assert rec["sampled_per_culture"] == rec["items_per_culture"] == [4, 4, 4]
    assert rec["prefills"] == rec["exact_prefills"] == 12 * 13


# -- 2. its tests and cells, by hand from the kept scores ---------------------------------------
def _accuracy_changes(items: dict, name: str) -> torch.Tensor:
    """[C, n] accuracy points, NaN where not computed, written out again here."""
    pred, full, labels = items[f"scores.{name}"], items["full"], items["labels"]
    change = 100.0 * ((pred == labels).double() - (full == labels).double())
    return torch.where(pred == NOT_COMPUTED, torch.nan, change)


def _flip_changes(items: dict, name: str) -> torch.Tensor:
    pred, full = items[f"scores.{name}"], items["full"]
    return torch.where(pred == NOT_COMPUTED, torch.nan, (pred != full).double())


def _cell_means(change: torch.Tensor, culture: torch.Tensor, C: int) -> list[list[float]]:
    """Each cell the plain mean of its computed items, in Python floats."""
    out = []
    for s in range(C):
        row = []
        for c in range(C):
            vals = [float(change[s, i]) for i in range(len(culture))
                    if int(culture[i]) == c and not math.isnan(float(change[s, i]))]  # fmt: skip
            row.append(sum(vals) / len(vals))
        out.append(row)
    return out


@pytest.mark.parametrize("method", ["cas", "lap"])
def test_its_tests_equal_compare_to_random_by_hand(sample_run, method):
    items = _items(sample_run)
    ev = json.loads((sample_run / "eval" / f"{method}.json").read_text())
    culture, C = items["culture"], len(ev["cultures"])
    seed = ev["bootstrap_seed"] % 2**32
    draws = ev["rnd"]["masks"]
    assert len(draws) == 1
    for change, prefix, direction in ((_accuracy_changes, "", -1), (_flip_changes, "flip_", 1)):
        mine = change(items, method)
        assert int(torch.isnan(mine).sum()) == C * (C - 1) * 2  # 2 of 4 off the diagonal, per cell
        null = torch.stack([change(items, d) for d in draws])
        gap = cn.compare_to_random(mine, null, culture, "gap", direction=direction, seed=seed)
        spec = cn.compare_to_random(mine, null, culture, "specificity", direction=direction,
                                    seed=seed)  # fmt: skip
        assert ev[f"p_{prefix}gap_vs_rnd"] == gap.p, prefix
        # every detail of both tests (the draws' values, the total and its interval, ...)
        for test, res in ((f"{prefix}gap", gap), (f"{prefix}specificity", spec)):
            written = {k: v for k, v in ev["tests"][test].items() if k != "role"}
            assert written == json.loads(json.dumps(res.as_dict())), test
        assert ev[f"{prefix}gap"] == pytest.approx(gap.value, abs=1e-9), prefix
        assert ev[f"{prefix}specificity"] == (None if spec.value != spec.value else spec.value)
        assert ev[f"p_{prefix}specificity_vs_rnd"] == (None if spec.p != spec.p else spec.p)
        assert ev["tests"][f"{prefix}specificity"]["test"] == spec.test
        # the cells: means over the computed items, by hand
        key = "delta" if prefix == "" else "flip"
        by_hand = _cell_means(mine, culture, C)
        for s in range(C):
            for c in range(C):
                assert ev[key][s][c] == pytest.approx(by_hand[s][c], abs=1e-12), (key, s, c)
        # the gap from the cells: self (diagonal) - cross (off-diagonal), cultures weighted alike
        self_ = sum(by_hand[s][s] for s in range(C)) / C
        cross = sum(by_hand[s][c] for s in range(C) for c in range(C) if c != s) / (C * (C - 1))
        assert ev[f"{prefix}gap"] == pytest.approx(self_ - cross, abs=1e-9)
    # accuracy: the full model's (all items) moved by the paired change; cell p's on computed items
    acc_full = [sum(float(items["full"][i] == items["labels"][i]) for i in range(len(culture))
                    if int(culture[i]) == c) * 100 / 4 for c in range(C)]  # fmt: skip
    assert ev["accuracy_full"] == pytest.approx(acc_full, abs=1e-12)
    for s in range(C):
        for c in range(C):
            assert ev["accuracy"][s][c] == pytest.approx(acc_full[c] + ev["delta"][s][c], abs=1e-9)
    p = cell_p(_accuracy_changes(items, method), culture, C, seed=seed)
    assert ev["delta_cell_p"] == [[None if v != v else float(v) for v in row] for row in p.tolist()]


def test_a_cell_is_not_the_mean_over_every_item(sample_run):
    """The kept scores make a difference here: treating a not-computed -2 as an answer (wrong)
    would move some cell, so the by-hand means above are a real check."""
    items = _items(sample_run)
    culture, C = items["culture"], 3
    moved = False
    for name in ("cas", "lap"):
        pred, full, labels = items[f"scores.{name}"], items["full"], items["labels"]
        naive = 100.0 * ((pred == labels).double() - (full == labels).double())
        moved |= _cell_means(naive, culture, C) != _cell_means(_accuracy_changes(items, name),
                                                               culture, C)  # fmt: skip
    assert moved


# -- 3. resumable and refused -------------------------------------------------------------------
def test_a_share_under_another_mode_is_refused(exact_run, tmp_path, capsys):
    for mode in ("exact", "estimate", "screen"):
        with pytest.raises(UsageError, match="--matrix sample"):
            RunConfig(matrix=mode, sample_share=SHARE)
    assert RunConfig(matrix="sample").sample_share == 0.25  # the default share
    assert RunConfig(matrix="sample", sample_share=SHARE).sample_share == SHARE
    out = tmp_path / "run"
    shutil.copytree(exact_run, out)
    before = _evals(out)
    capsys.readouterr()
    code = cli.main(["evaluate", "--out", str(out), "--matrix", "exact", "--sample-share",
                     str(SHARE), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--matrix sample" in err and "--sample-share" in err
    assert _evals(out) == before  # nothing evaluated
    assert json.loads((out / "run.json").read_text())["config"]["matrix"] == "exact"
    for bad in ("0", "1.5"):
        assert cli.main(["evaluate", "--out", str(out), "--matrix", "sample", "--sample-share",
                         bad, "--quiet"]) != 0  # fmt: skip
    assert _evals(out) == before


def test_an_interrupted_sample_evaluation_resumes(exact_run, sample_run, tmp_path, monkeypatch):
    """Stopped at its third group (as Ctrl-C would), `evaluate --matrix sample` continues from
    progress/sample.jsonl: the resume computes only the groups not logged, the numbers are the
    uninterrupted evaluation's; evaluated once more, it computes nothing."""
    from culture_neurons.tasks.mc import MCTask

    out = tmp_path / "run"
    shutil.copytree(exact_run, out)
    real, calls = MCTask.group, []

    def stopping(self, chunk):
        calls.append([it.id for it in chunk])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(MCTask, "group", stopping)
    assert cli.main(["evaluate", "--out", str(out), *SAMPLE]) == 130
    log = out / "progress" / "sample.jsonl"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == 2 and [r["items"] for r in logged] == calls[:2]
    total = len((sample_run / "progress" / "sample.jsonl").read_text().splitlines())
    assert total > 3
    calls.clear()
    monkeypatch.setattr(MCTask, "group", lambda self, chunk: (
        calls.append([it.id for it in chunk]), real(self, chunk))[1])  # fmt: skip
    assert cli.main(["evaluate", "--out", str(out), *SAMPLE]) == 0
    assert len(calls) == total - 2  # the logged groups were not computed again
    assert not {tuple(c) for c in calls} & {tuple(r["items"]) for r in logged}
    assert len(log.read_text().splitlines()) == total
    assert _evals(out) == _evals(sample_run)
    a, b = _items(out), _items(sample_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def never(self, chunk):
        raise AssertionError("a logged group was computed again")

    monkeypatch.setattr(MCTask, "group", never)
    assert cli.main(["evaluate", "--out", str(out), *SAMPLE]) == 0
    assert _evals(out) == _evals(sample_run)
    # the run's share is carried to a later `evaluate --matrix sample` that names none
    assert cli.main(["evaluate", "--out", str(out), "--matrix", "sample", "--quiet"]) == 0
    assert _evals(out) == _evals(sample_run)
    # another share is another computation: no group of the log serves it, every one of its
    # groups is computed, and where computed its scores are exact's
    calls.clear()
    monkeypatch.setattr(MCTask, "group", lambda self, chunk: (
        calls.append([it.id for it in chunk]), real(self, chunk))[1])  # fmt: skip
    assert cli.main(["evaluate", "--out", str(out), "--matrix", "sample", "--sample-share", "0.6",
                     "--quiet"]) == 0  # fmt: skip
    assert len(calls) == len(log.read_text().splitlines()) > 0
    full = json.loads((out / "eval" / "full.json").read_text())
    culture = torch.tensor(full["culture"])
    want = _computed_by_hand(_chosen_by_hand(full["items"], culture, 3, 0.6, 0), culture, 3)
    assert int(want.sum()) == 3 * (4 + 3 * 2)  # ceil(0.6 x 4) = 3 of each other culture
    got, exact = _items(out), _items(exact_run)
    for name in (k for k in got if k.startswith("scores.")):
        assert torch.equal(got[name] != NOT_COMPUTED, want), name
        assert torch.equal(got[name][want], exact[name][want]), name
    assert json.loads((out / "eval" / "cas.json").read_text())["sample"]["share"] == 0.6
    # and dropped by `evaluate --matrix exact` (not refused): exact's own log serves it whole
    monkeypatch.setattr(MCTask, "group", never)
    assert cli.main(["evaluate", "--out", str(out), "--matrix", "exact", "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["sample_share"] is None
    assert _evals(out) == _evals(exact_run)
    _same_items(out, exact_run)


# -- 4. two gloo ranks and merged shards: one process's numbers ----------------------------------
def _same_items(a, b) -> None:
    a, b = _items(a), _items(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sample_under_two_ranks_equals_one_process(exact_run, sample_run, tmp_path):
    """``evaluate --matrix sample`` on 2 gloo ranks: each rank its share of the groups, the
    one process's eval JSONs and kept per-item scores."""
    multi = tmp_path / "multi"
    shutil.copytree(exact_run, multi)
    _two_ranks(["evaluate", "--out", str(multi), *SAMPLE])
    a, b = _evals(sample_run), _evals(multi)
    assert a == b and a["cas"]["matrix"] == "sample" and a["cas"]["sample"]["share"] == SHARE
    _same_items(sample_run, multi)
    # each rank logged its own groups, together every group once
    logs = [(multi / "progress" / f"sample-{r}of2.jsonl").read_text().splitlines()
            for r in range(2)]  # fmt: skip
    groups = [json.loads(line)["group"] for lines in logs for line in lines]
    single = (sample_run / "progress" / "sample.jsonl").read_text().splitlines()
    assert all(logs) and sorted(groups) == list(range(len(single)))


def test_sharded_statistics_sample_like_one_process(assets, sample_run, tmp_path):
    """``record --shard`` + ``merge``, then select and ``evaluate --matrix sample``: the single
    process's sampled eval JSONs and per-item scores."""
    shards = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        assert cli.main(["record", *assets, "--out", str(out), "--shard", f"{i}/2"]) == 0
        shards.append(out)
    merged = tmp_path / "merged"
    assert cli.main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    assert cli.main(["select", "--out", str(merged), *SELECT]) == 0
    assert cli.main(["evaluate", "--out", str(merged), "--resamples", "50", *SAMPLE]) == 0
    a, b = _evals(sample_run), _evals(merged)
    assert a.keys() == b.keys()
    for name in a:  # the same masks (their hash) and numbers
        assert a[name] == b[name], name
    _same_items(sample_run, merged)


# -- 5. the LM task: token-weighted cells over the computed items --------------------------------
@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """An exact LM run of the tiny Llama on Faker sentences, and the same masks evaluated
    with --matrix sample in another folder."""
    pytest.importorskip("faker")
    from culture_neurons.data.faker_text import make_faker_data
    from culture_neurons.pipeline.run import Run
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    model, tok = tiny_model("llama").eval(), tiny_processor("llama")
    data = make_faker_data(["de_DE", "ja_JP", "ru_RU"], per_culture=8, seed=0)
    config = RunConfig(methods=("cas", "lap"), ratio=0.05, rnd_draws=1, batch_size=4,
                       identify_on="all", resamples=50, task="lm")  # fmt: skip
    exact_out = tmp_path_factory.mktemp("lm_exact")
    run = Run(model, tok, data, exact_out, config, progress=False)
    exact = run.run()
    sample_out = tmp_path_factory.mktemp("lm_sample")
    again = Run(model, tok, data, sample_out, replace(config, matrix="sample", sample_share=SHARE),
                progress=False)  # fmt: skip
    results = again.evaluate(run.load_masks())
    return {"exact": exact, "exact_out": exact_out, "results": results, "out": sample_out}


def _lm_share(out) -> tuple[torch.Tensor, torch.Tensor, int]:
    full = json.loads((out / "eval" / "full.json").read_text())
    culture = torch.tensor(full["culture"])
    C = int(culture.max()) + 1
    return _chosen_by_hand(full["items"], culture, C, SHARE, 0), culture, C


def test_lm_sample_cells_are_token_weighted_means_over_computed_items(lm_runs):
    out, results = lm_runs["out"], lm_runs["results"]
    items, exact = _items(out), _items(lm_runs["exact_out"])
    chosen, culture, C = _lm_share(out)
    n = len(culture)
    full, tokens = items["full"].double(), items["tokens"].double()
    assert torch.equal(items["tokens"], exact["tokens"])
    torch.testing.assert_close(items["full"], exact["full"], rtol=0, atol=1e-4)
    want = _computed_by_hand(chosen, culture, C)
    names = [k.removeprefix("scores.") for k in items if k.startswith("scores.")]
    for name in names:
        sums = items[f"scores.{name}"]
        assert torch.equal(~torch.isnan(sums), want), name  # NaN: not computed, exactly there
        # the exact run's summed NLL where computed (up to the batches' last bits)
        torch.testing.assert_close(sums[want], exact[f"scores.{name}"][want], rtol=0, atol=1e-4)
    for method, ev in results.items():
        assert ev["matrix"] == "sample"
        assert ev["sample"]["prefills"] == n + len(names) * int(want.sum())
        assert ev["sample"]["exact_prefills"] == n * (1 + C * len(names))
        sums = items[f"scores.{method}"].double()
        nll_full = [
            sum(full[i] for i in range(n) if culture[i] == c)
            / sum(tokens[i] for i in range(n) if culture[i] == c)
            for c in range(C)
        ]
        assert ev["nll_full"] == pytest.approx([float(x) for x in nll_full], abs=1e-12)
        for s in range(C):
            for c in range(C):
                where = [i for i in range(n) if culture[i] == c and want[s, i]]
                assert len(where) == (4 if s == c else 2)
                by_hand = (sum(float(sums[s, i] - full[i]) for i in where)
                           / sum(float(tokens[i]) for i in where))  # fmt: skip
                assert ev["delta"][s][c] == pytest.approx(by_hand, rel=1e-12, abs=1e-12), (
                    method,
                    s,
                    c,
                )
                assert ev["nll"][s][c] == pytest.approx(float(nll_full[c]) + by_hand, abs=1e-12)


def test_lm_sample_gap_p_equals_compare_to_random_by_hand(lm_runs):
    """The LM's per-item changes, written out: item i's summed NLL change x (items / tokens of
    its culture computed under the set), NaN where not computed; the JSON's gap p is
    compare_to_random's on them."""
    out, ev = lm_runs["out"], lm_runs["results"]["cas"]
    items = _items(out)
    chosen, culture, C = _lm_share(out)
    want = _computed_by_hand(chosen, culture, C)
    full, tokens = items["full"].double(), items["tokens"].double()

    def change(name):
        sums = items[f"scores.{name}"].double()
        x = torch.full(sums.shape, torch.nan, dtype=torch.float64)
        for s in range(C):
            for c in range(C):
                where = [i for i in range(len(culture)) if culture[i] == c and want[s, i]]
                scale = len(where) / sum(float(tokens[i]) for i in where)
                for i in where:
                    x[s, i] = (sums[s, i] - full[i]) * scale
        return x

    draws = torch.stack([change(d) for d in ev["rnd"]["masks"]])
    res = cn.compare_to_random(change("cas"), draws, culture, "gap", direction=1,
                               seed=ev["bootstrap_seed"] % 2**32)  # fmt: skip
    assert ev["p_gap_vs_rnd"] == res.p
    assert ev["gap"] == pytest.approx(res.value, abs=1e-9)
    written = {k: v for k, v in ev["tests"]["gap"].items() if k != "role"}
    want = json.loads(json.dumps(res.as_dict()))
    floats = ("value", "draws_value")  # the same sums in another order: to the last bits
    assert {k: v for k, v in written.items() if k not in floats} == \
        {k: v for k, v in want.items() if k not in floats}  # fmt: skip
    for k in floats:
        assert written[k] == pytest.approx(want[k], rel=1e-12)


# -- 6. the report ---------------------------------------------------------------------------------
def test_report_of_a_sample_run_says_so_and_marks_nothing_estimated(sample_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sample_run, out)
    (out / "report.md").unlink()
    before = _evals(out)
    assert cli.main(["report", "--out", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    rec = before["cas"]["sample"]
    assert "Matrix mode `sample`" in report
    assert (
        f"{rec['prefills']} of the exact matrix's {rec['exact_prefills']} item prefills" in report
    )
    assert "(2 of 4 items per culture)" in report
    assert f"on a {SHARE} share" in report  # the settings line
    assert "first-order estimate" not in report and "Estimated cells are marked" not in report
    tables = [line for line in report.splitlines() if line.lstrip().startswith("|")]
    assert tables and not [line for line in tables if "~" in line]
    # the tests recomputed from the kept scores are the ones evaluate wrote
    after = _evals(out)
    for m in ("cas", "lap"):
        for key in ("p_gap_vs_rnd", "p_specificity_vs_rnd", "specificity", "tests",
                    "delta_cell_p", "delta_cell_q"):  # fmt: skip
            assert after[m][key] == before[m][key], (m, key)
