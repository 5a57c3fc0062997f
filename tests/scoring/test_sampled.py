"""``--matrix sample``'s statistics (culture_neurons.scoring.sampled): which items it computes,
the cells, total interval and tests on partly computed changes against hand computations, and,
in simulations with a known truth, the tests' level (3-7 % rejections at 0.05 under the null)
and power and the intervals' coverage (93-97 %) when the off-diagonal cells rest on a share of
the items (the data of tests/scoring/test_random_control)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_random_control import _continuous, _simulate

import culture_neurons as cn
from culture_neurons.scoring import random_control as R
from culture_neurons.scoring import sampled as SM
from culture_neurons.scoring import uncertainty as U
from culture_neurons.scoring.metrics import summaries
from culture_neurons.scoring.multiplicity import cell_p

ALPHA = 0.05


def _sampled(change, culture, C, share, rng):
    """``change`` [..., C, n] with NaN where ``--matrix sample`` at ``share`` does not compute
    (fresh random ids each call, so fresh shares), and the share [n]."""
    ids = [str(rng.integers(1 << 40)) for _ in range(len(culture))]
    chosen = SM.choose(ids, torch.as_tensor(culture), C, share, seed=0)
    rows = np.arange(C)[:, None] == np.asarray(culture)[None, :]
    computed = rows | chosen.numpy()[None, :]
    return np.where(computed, change, np.nan), chosen


# --- which items ----------------------------------------------------------------------------


def test_computed_rows_are_the_own_culture_and_the_share():
    culture = torch.tensor([0, 0, 1, 1, 1])
    chosen = torch.tensor([False, True, False, False, True])
    want = [[1, 1, 0, 0, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0, 1], [0, 1, 1, 1, 1]]  # sets 0..3
    assert SM.computed(chosen, culture, 4, 2).long().tolist() == want


# --- partly computed changes, by hand -------------------------------------------------------


def test_cells_total_and_tests_leave_items_not_computed_out_by_hand():
    nan = math.nan
    culture = torch.tensor([0, 0, 0, 1, 1, 1])
    e = torch.tensor([[3.0, 1.0, 2.0, nan, 4.0, 6.0],  # set of culture 0: item 3 not computed
                      [nan, 5.0, 1.0, 2.0, 2.0, 5.0]], dtype=torch.float64)  # fmt: skip
    cells = R.cells(e, culture, 2)
    assert cells.tolist() == [[2.0, 5.0], [3.0, 3.0]]
    # total: per-item y = change / its cell's computed count, strata (culture, computed rows)
    y = np.array([3 / 3, 1 / 3 + 5 / 2, 2 / 3 + 1 / 2, 2 / 3, 4 / 2 + 2 / 3, 6 / 2 + 5 / 3])
    strata = [[0], [1, 2], [3], [4, 5]]
    parts = [(len(g) * y[g].var(ddof=1), len(g) - 1) for g in strata if len(g) > 1]
    var = sum(v for v, _ in parts)
    df = var**2 / sum(v**2 / d for v, d in parts)  # Welch-Satterthwaite
    half = U.t_quantile(0.975, max(df, 1.0)) * math.sqrt(var)
    total, (lo, hi) = R.total_interval(e, culture, 2)
    assert total == pytest.approx(cells.sum().item()) == pytest.approx(y.sum())
    assert (lo, hi) == pytest.approx((y.sum() - half, y.sum() + half))
    # the own-row test reassigns only the items computed under every row
    p_partial, _ = R._own_row_test(e, culture, 2, 500, seed=3)
    keep = [1, 2, 4, 5]
    assert p_partial == R._own_row_test(e[:, keep], culture[keep], 2, 500, seed=3)[0]
    # a cell's sign test on its computed items only (accuracy changes: an exact binomial)
    flips = torch.tensor([[-100.0, 0, -100, nan, -100, -100], [nan, 100, 0, 100, 100, 100]])
    p = cell_p(flips, culture, 2)
    assert p[0].tolist() == [0.5, 0.5]  # 2 of 2 down: 2 x 1/4 (item 3 left out, not counted)
    assert p[1].tolist() == [1.0, 0.25]  # 1 of 1 up; 3 of 3 up: 2 x 1/8


def test_bootstrap_keeps_each_cultures_share_and_others_apart():
    culture = torch.tensor([0] * 6 + [1] * 5)
    complete = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    boot = U.Bootstrap.draw(culture, 2, resamples=200, seed=1, complete=complete)
    assert bool((complete[boot.index] == complete[None, :]).all())  # slot keeps its stratum
    assert bool((culture[boot.index] == culture[None, :]).all())
    assert boot.cell_items.tolist() == [2, 3]
    values = torch.where(complete, torch.arange(11.0), torch.nan)
    means = boot.culture_means(values)  # [B, C] over the resampled complete items
    b0 = boot.index[0]
    mine = [int(i) for i in b0[:6] if complete[i]]
    assert means[0, 0].item() == pytest.approx(np.mean(mine))
    plain = U.Bootstrap.draw(culture, 2, resamples=200, seed=1, complete=torch.ones(11, dtype=bool))
    assert torch.equal(plain.index, U.Bootstrap.draw(culture, 2, resamples=200, seed=1).index)


# --- calibration under sampling -------------------------------------------------------------


def _rejections(measure, share, reps, seed, C=8, D=3, continuous=False, **kw):
    rng = np.random.default_rng(seed)
    ps = []
    for r in range(reps):
        if continuous:
            method, draws, culture = _continuous(rng, C, 20, **kw)
            direction = 1
        else:
            method, draws, culture = _simulate(rng, C, D, 20, **kw)
            direction = -1
        method, chosen = _sampled(method, culture, C, share, rng)
        draws = np.where(np.isnan(method)[None], np.nan, draws)  # the same items for the draws
        ps.append(cn.compare_to_random(method, draws, culture, measure, direction, seed=r,
                                       permutations=1000).p)  # fmt: skip
    return np.mean(np.nan_to_num(ps, nan=1.0) <= ALPHA)


@pytest.mark.slow
def test_gap_test_on_a_quarter_share_holds_its_level_and_keeps_power():
    """C = 8, D = 3, 20 items per culture, 5 of them off the diagonal (measured: level 0.058,
    power 0.81 against exact's 0.86 on the same data)."""
    assert 0.03 <= _rejections("gap", 0.25, 400, seed=1) <= 0.07
    assert _rejections("gap", 0.25, 200, seed=2, own=0.10) >= 0.7


@pytest.mark.slow
def test_specificity_against_rnd_on_a_quarter_share_holds_its_level_and_has_power():
    """RND does something (base 0.2); measured level 0.033, power 0.82 (exact: 0.97)."""
    assert 0.03 <= _rejections("specificity", 0.25, 400, seed=3, base=0.2) <= 0.07
    assert _rejections("specificity", 0.25, 200, seed=4, base=0.2, own=0.25) >= 0.7


@pytest.mark.slow
def test_specificity_against_the_uniform_share_on_a_quarter_share():
    """RND does nothing: the own-row test on the items computed under every row (5 per
    culture). Level measured 0.0505 over 2000 continuous runs (0.0455 exact); power 0.46 where
    exact's is 0.96: the price of the share, which the report states."""
    assert 0.03 <= _rejections("specificity", 0.25, 400, seed=5, continuous=True, own=1.0,
                               others=1.0) <= 0.07  # fmt: skip
    assert _rejections("specificity", 0.25, 200, seed=6, own=0.3, others=0.15, base=0.0) >= 0.3


@pytest.mark.slow
@pytest.mark.parametrize("C,n_c,share", [(3, 80, 0.25), (8, 160, 0.125)])
def test_intervals_cover_when_cross_rests_on_twenty_sampled_items(C, n_c, share):
    """Known truth: set s hurts an item of culture c with probability p[s, c]; 20 items per
    culture sampled off the diagonal; the gap's and cross's 95 % bootstrap intervals (strata:
    each culture's share and its others; expanded at the share's count) and the total's t
    interval must cover in 93-97 % of 500 runs (measured over 1000: 0.945-0.96 at C = 8;
    0.95 for gap and cross at C = 3). The total's t interval, the gate of a defined
    specificity, is the exception at C = 3: 0.93-0.937 over 1000-2000 runs (0.946 with every
    item computed): its variance rests on 3 x 20 sampled items whose changes are sums of two
    rare binary harms, skewed, so it is held to 92-97 % there."""
    rng = np.random.default_rng(C)
    culture = np.repeat(np.arange(C), n_c)
    prob = rng.uniform(0.05, 0.15, (C, C))
    np.fill_diagonal(prob, 0.25)
    off = ~np.eye(C, dtype=bool)
    truth = {"gap": -100 * (prob.diagonal().mean() - prob[off].mean()),
             "cross": -100 * prob[off].mean(), "total": 100 * prob.sum()}  # fmt: skip
    covered = dict.fromkeys(truth, 0)
    for r in range(500):
        hurt = rng.random((C, C * n_c)) < prob[:, culture]
        change, chosen = _sampled(-100.0 * hurt, culture, C, share, rng)
        change = torch.from_numpy(change)
        boot = U.Bootstrap.draw(torch.from_numpy(culture), C, resamples=300, seed=r,
                                complete=chosen)  # fmt: skip
        s = summaries(boot.culture_means(change).permute(1, 0, 2))
        items = int(boot.cell_items.min())
        assert items == 20
        for k in ("gap", "cross"):
            lo, hi = U.interval(s[k], items=items).tolist()
            covered[k] += lo <= truth[k] <= hi
        _, (lo, hi) = R.total_interval(-change, torch.from_numpy(culture), C)
        covered["total"] += lo <= truth["total"] <= hi
    for k, v in covered.items():
        floor = 0.92 if (k, C) == ("total", 3) else 0.93
        assert floor <= v / 500 <= 0.97, (k, v / 500)
