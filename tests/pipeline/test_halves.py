"""Split-half statistics: recorded in the same forwards as the whole, they add up to it
(counts exactly, sums to fp64 rounding), each half holds the items its hash says, and the
stability of identical halves is 1."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import save_cli_assets

from culture_neurons.data import load_cvqa
from culture_neurons.errors import DataError
from culture_neurons.pipeline import cli, halves
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.stats import Fingerprint, Stats, load_stats

SMALL = ["--min-items", "4", "--ratio", "0.05", "--rnd-draws", "2", "--batch-size", "4",
         "--methods", "cas,lap,mad", "--resamples", "50", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run recorded with and without halves (every item: --identify-on all),
    and one scored in one pass (--identify-on correct: items committed after the forward)."""
    root = tmp_path_factory.mktemp("halves")
    assets = save_cli_assets(root, "qwen2_5_vl", items=10)
    base = ["--model", assets["model"], "--data", assets["data"], *SMALL]
    out = {}
    for name, extra in (("halves", ["--identify-on", "all"]),
                        ("whole", ["--identify-on", "all", "--no-halves"]),
                        ("correct", ["--identify-on", "correct"])):  # fmt: skip
        out[name] = root / name
        assert cli.main(["run", "--out", str(out[name]), *base, *extra]) == 0
    return out, assets


def test_half_is_a_stable_hash_of_the_item_id():
    for item_id in ["a", "item-17", "日本-3", ""]:
        digest = hashlib.sha256(("half" + "\x1f" + item_id).encode()).digest()
        assert halves.half_of(item_id) == (int.from_bytes(digest[:8], "big") >> 1) & 1
    share = sum(halves.half_of(f"q{i}") for i in range(4000)) / 4000
    assert 0.46 < share < 0.54  # two halves of about equal size


def test_halves_add_up_to_the_whole(runs):
    out, _ = runs
    for name in ("halves", "correct"):
        whole = load_stats(out[name])
        groups = load_stats(out[name] / halves.HALVES_DIR)
        a, b = halves.split(groups, whole.cultures)
        for t in ("T", "K", "items"):  # counts: exact
            assert torch.equal(getattr(a, t) + getattr(b, t), getattr(whole, t)), (name, t)
        for t in ("S", "Q"):  # fp64 sums of the same fp32 per-forward parts, other order
            torch.testing.assert_close(getattr(a, t) + getattr(b, t), getattr(whole, t),
                                       rtol=1e-12, atol=1e-9)  # fmt: skip
        assert int(a.items.sum()) > 0 and int(b.items.sum()) > 0


def test_recording_halves_changes_nothing_else(runs):
    """The whole from the halves equals a recording without them (an independent run)."""
    out, _ = runs
    with_halves, alone = load_stats(out["halves"]), load_stats(out["whole"])
    for t in ("T", "K", "items"):
        assert torch.equal(getattr(with_halves, t), getattr(alone, t)), t
    for t in ("S", "Q"):  # a forward sums each group's rows in fp32: with halves, in two
        # partial sums per culture instead of one, so the whole differs by fp32 rounding
        torch.testing.assert_close(getattr(with_halves, t), getattr(alone, t), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    assert not (out["whole"] / halves.HALVES_DIR).exists()
    assert "stability" not in json.loads((out["whole"] / "eval" / "cas.json").read_text())
    assert "Not recorded: the statistics were recorded without halves" in (out["whole"] / "report.md").read_text()


def test_each_half_holds_the_items_its_hash_says(runs):
    out, assets = runs
    data = load_cvqa(assets["data"], min_items=4)
    ident, _ = data.split(0.5, 0)
    whole = load_stats(out["halves"])
    a, b = halves.split(load_stats(out["halves"] / halves.HALVES_DIR), whole.cultures)
    for c, name in enumerate(whole.cultures):
        ids = [it.id for it in ident.items_by_culture[name]]
        want = [sum(halves.half_of(i) == h for i in ids) for h in (0, 1)]
        assert [int(a.items[c]), int(b.items[c])] == want, name


def test_eval_json_carries_each_methods_stability(runs):
    out, _ = runs
    for method in ("cas", "lap", "mad"):
        st = json.loads((out["halves"] / "eval" / f"{method}.json").read_text())["stability"]
        if "unavailable" in st:
            continue
        C = len(st["names"])
        assert len(st["jaccard"]) == len(st["expected"]) == len(st["sizes"]) == C
        assert all(0 <= j <= 1 for j in st["jaccard"] if j is not None)
        assert st["pool"] == 3 * 96  # the tiny qwen2.5-vl: 3 layers x 96 neurons
    report = (out["halves"] / "report.md").read_text()
    assert "## Split-half stability" in report


def _groups(C=3, L=2, N=30, seed=0) -> tuple[Stats, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    fp = Fingerprint("llama", "llama", L, N, 8, "silu", "0" * 64)
    cultures = [f"c{i}" for i in range(C)]
    g = Stats.zeros(halves.group_names(cultures), fp)
    g.T[:] = torch.randint(500, 1000, (2 * C,), generator=gen)
    g.K[:] = (torch.rand(2 * C, L, N, generator=gen) * g.T.view(-1, 1, 1) * 0.9).long()
    g.S[:] = torch.rand(2 * C, L, N, generator=gen, dtype=torch.float64)
    g.Q[:] = g.S**2
    g.items[:] = 5
    return g, cultures


def test_identical_halves_are_perfectly_stable():
    g, cultures = _groups()
    for t in ("T", "K", "S", "Q", "items"):  # half 1 := half 0: the same items twice
        getattr(g, t)[1::2] = getattr(g, t)[0::2]
    config = RunConfig(methods=("cas", "lap", "lape", "mad"), ratio=0.1, lape_top_rate=0.1)
    got = halves.stability(g, cultures, config)
    for method, st in got.items():
        js = [j for j in st["jaccard"] if j is not None]
        assert js and all(j == 1.0 for j in js), (method, st)
        assert st["mean"] == 1.0 and st["expected_mean"] < 0.2


def test_a_culture_missing_from_a_half_is_said():
    g, cultures = _groups()
    g.T[3] = 0  # culture 1, half 1: nothing counted
    got = halves.stability(g, cultures, RunConfig(methods=("lap",), ratio=0.1))
    assert got["lap"] == {"unavailable": "no token counted for c1 (half 1)"}


def test_halves_that_do_not_add_up_are_refused(tmp_path, caplog):
    g, cultures = _groups()
    halves.save(g, tmp_path)
    whole = halves.fold(g, cultures)
    whole.save(tmp_path)
    assert halves.load(tmp_path, whole) is not None
    other = whole.clone()
    other.K[0, 0, 0] += 1
    with pytest.raises(DataError, match="does not add up"):
        halves.load(tmp_path, other)
    # at the end of an evaluation: no stability, one warning naming why
    assert halves.of_run(tmp_path, other, RunConfig(methods=("lap",), ratio=0.1)) is None
    assert "does not add up" in caplog.text
