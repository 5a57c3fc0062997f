"""compare_to_random against hand computations (ties, signs, shapes) and, in simulations with a
known truth, its level (both sides: 3-7 % rejections at 0.05 under the null) and power.

The simulated data are accuracy changes of binary items (points): the full model answers right
with probability 0.7; a set hurts an item it answers right with probability ``0.05 x strength``,
``strength ~ Gamma(2, 0.5)`` drawn per set (sets of the same size differ), plus ``own`` more on
its own culture's items for a selective method. Under the null the method is one more draw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import culture_neurons as cn
from culture_neurons.errors import UsageError
from culture_neurons.scoring import random_control as R
from culture_neurons.scoring import uncertainty as U

ALPHA = 0.05


def _simulate(rng, C, D, n_c, own=0.0, base=0.05, others=0.0):
    """(method [C, n], draws [D, C, n], culture [n]) accuracy changes in points; ``others``
    adds harm of the method's set on the other cultures' items."""
    culture = np.repeat(np.arange(C), n_c)
    n = C * n_c
    correct = rng.random(n) < 0.7
    strength = rng.gamma(2.0, 0.5, size=(D + 1, C, 1))
    prob = base * strength * np.ones((D + 1, C, n))
    mine = np.arange(C)[:, None] == culture[None]
    prob[0] += np.where(mine, own, others)
    hurt = rng.random((D + 1, C, n)) < prob
    change = -100.0 * (hurt & correct)
    return change[0], change[1:], culture


def _rejections(C, D, n_c, reps, measure="gap", seed=0, **kw) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ps = []
    for r in range(reps):
        method, draws, culture = _simulate(rng, C, D, n_c, **kw)
        ps.append(cn.compare_to_random(method, draws, culture, measure, -1, seed=r).p)
    return np.array(ps)


# --- hand computations -------------------------------------------------------------------


def test_gap_p_is_the_share_of_every_recombination_by_hand():
    rng = np.random.default_rng(1)
    C, D, n = 3, 2, 13
    culture = torch.tensor(rng.integers(0, C, n))
    culture[:C] = torch.arange(C)  # every culture has items
    method, draws = torch.randn(C, n, dtype=torch.float64), torch.randn(D, C, n, dtype=torch.float64)
    sets = [method, *draws]

    def gap(m):  # plain: per-culture means, mean diagonal - mean off-diagonal
        cells = torch.stack([m[:, culture == c].mean(1) for c in range(C)], 1)
        off = ~torch.eye(C, dtype=torch.bool)
        return (cells.diagonal().mean() - cells[off].mean()).item()

    observed = gap(method)
    null = [gap(torch.stack([sets[j][s] for s, j in enumerate(pick)]))
            for pick in itertools.product(range(D + 1), repeat=C)]  # fmt: skip
    res = cn.compare_to_random(method, draws, culture, "gap", direction=-1)
    assert res.value == pytest.approx(observed, abs=1e-12)
    assert res.exact and res.null_size == (D + 1) ** C and res.test == "recombination"
    assert res.p == pytest.approx(np.mean([v <= observed + 1e-12 for v in null]))
    up = cn.compare_to_random(method, draws, culture, "gap", direction=1)
    assert up.p == pytest.approx(np.mean([v >= observed - 1e-12 for v in null]))
    two = cn.compare_to_random(method, draws, culture, "gap", direction=0)
    assert two.p == pytest.approx(min(1.0, 2 * min(res.p, up.p)))
    assert res.draws_value == pytest.approx([gap(d) for d in draws])


def test_ties_are_ties_and_the_floor_is_one_recombination():
    culture = torch.tensor([0, 1, 2, 0, 1, 2])
    method = torch.tensor([[-100.0, 0, 0, 0, 0, 0], [0, -100.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, -100.0]])
    # every draw equal to the method (sums computed in another order: rounding differs)
    draws = method.expand(4, 3, 6).clone() * (1 + 1e-15)
    for d in (-1, 0, 1):
        assert cn.compare_to_random(method, draws, culture, "gap", d).p == 1.0
    far = torch.zeros(4, 3, 6)  # draws do nothing: the method is the one most extreme
    res = cn.compare_to_random(method, far, culture, "gap", -1)
    assert res.p == pytest.approx(1 / 5**3) and res.p_floor == pytest.approx(1 / 5**3)
    assert cn.compare_to_random(method, far, culture, "gap", 1).p == 1.0  # wrong side


def test_monte_carlo_counts_the_observed_once():
    rng = np.random.default_rng(2)
    C, D = 8, 5  # 6^8 > EXACT_LIMIT
    method, draws, culture = _simulate(rng, C, D, 5, own=0.9)
    res = cn.compare_to_random(method, draws, culture, permutations=99, seed=3)
    assert not res.exact and res.null_size == 100 and res.p == pytest.approx(0.01)
    again = cn.compare_to_random(method, draws, culture, permutations=99, seed=3)
    assert again == res  # seeded


def test_specificity_is_oriented_clipped_and_undefined_without_harm():
    culture = torch.tensor([0] * 10 + [1] * 10)
    rng = np.random.default_rng(0)
    noise = torch.tensor(rng.normal(0, 1, (2, 20)))
    # the own culture loses 10 points, the other gains 2: share clipped to 1, not 1.25
    method = torch.zeros(2, 20, dtype=torch.float64)
    method[0, :10], method[1, 10:], method[0, 10:], method[1, :10] = -10, -10, 2, 2
    res = cn.compare_to_random(method + 0.01 * noise, torch.zeros(0, 2, 20), culture,
                               "specificity", -1)  # fmt: skip
    assert res.value == 1.0 and res.test == "uniform share" and res.reference == 0.5
    assert res.p < 0.01
    # a set that helps its own culture: no harm to share -> undefined, never "6.25"
    helps = -method
    res = cn.compare_to_random(helps + 0.01 * noise, torch.zeros(0, 2, 20), culture,
                               "specificity", -1)  # fmt: skip
    assert np.isnan(res.value) and np.isnan(res.p) and res.test == "undefined"
    assert res.total < 0 and res.total_ci[1] < 0
    # the same change read as a rise (direction +1) is harm: defined
    assert not np.isnan(cn.compare_to_random(helps + 0.01 * noise, torch.zeros(0, 2, 20),
                                             culture, "specificity", 1).value)  # fmt: skip
    # pure noise around 0: the total's interval holds 0 -> undefined
    res = cn.compare_to_random(noise, torch.zeros(0, 2, 20), culture, "specificity", -1)
    assert np.isnan(res.value) and res.total_ci[0] < 0 < res.total_ci[1]


def test_share_by_hand_and_total_interval_by_hand():
    assert R.share(0.5, 2.0) == 0.25 and R.share(3.0, 2.0) == 1.0 and R.share(-1.0, 2.0) == 0.0
    assert np.isnan(R.share(1.0, 0.0)) and np.isnan(R.share(1.0, -2.0))
    rng = np.random.default_rng(4)
    culture = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    e = torch.tensor(rng.normal(size=(2, 7)))
    total, (lo, hi) = R.total_interval(e, culture, 2)
    x = e.sum(0).numpy()
    a, b = x[:3], x[3:]
    assert total == pytest.approx(a.mean() + b.mean())
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch-Satterthwaite (5 if alike)
    half = U.t_quantile(0.975, df) * np.sqrt(va + vb)
    assert (lo, hi) == pytest.approx((total - half, total + half))
    assert U.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=2e-3)


def test_bad_input_is_a_usage_error():
    m, d, c = torch.zeros(3, 6), torch.zeros(2, 3, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    for kwargs, match in [
        (dict(measure="ratio"), "measure"), (dict(direction=2), "direction"),
        (dict(draws=torch.zeros(2, 3, 5)), "draws must be"),
        (dict(culture=torch.tensor([0, 1, 3, 0, 1, 2])), "culture must be"),
        (dict(draws=torch.zeros(0, 3, 6)), "at least one random draw"),
    ]:  # fmt: skip
        args = dict(method=m, draws=d, culture=c) | kwargs
        with pytest.raises(UsageError, match=match):
            cn.compare_to_random(**args)


# --- calibration (SPEC: 3-7 % rejections at 0.05 under a simulated null) --------------------


@pytest.mark.slow
@pytest.mark.parametrize("C,D", [(3, 10), (8, 3)])
def test_gap_test_holds_its_level_both_sides(C, D):
    p = _rejections(C, D, 20, reps=400, seed=C)
    assert 0.03 <= np.mean(p <= ALPHA) <= 0.07, np.mean(p <= ALPHA)


@pytest.mark.slow
@pytest.mark.parametrize("C,D,floor", [(3, 10, 0.45), (8, 3, 0.8)])
def test_gap_test_has_power(C, D, floor):
    """Alternative: the method's set hurts its own culture's right answers 10 % more often
    (measured: 0.56 at C = 3, where the bootstrap-averaged p of before had about 0.2)."""
    p = _rejections(C, D, 20, reps=200, seed=10 + C, own=0.10)
    assert np.mean(p <= ALPHA) >= floor, np.mean(p <= ALPHA)


def _continuous(rng, C, n_c, own, others):
    """NLL-like changes (a rise is harm): Normal(others, 1), own culture's cells Normal(own, 1)."""
    culture = np.repeat(np.arange(C), n_c)
    mine = np.arange(C)[:, None] == culture[None]
    return rng.normal(np.where(mine, own, others), 1.0), np.zeros((0, C, C * n_c)), culture


@pytest.mark.slow
@pytest.mark.parametrize("C,kind", [(3, "continuous"), (8, "binary"), (8, "continuous")])
def test_specificity_against_the_uniform_share_holds_its_level(C, kind):
    """Null: random sets do nothing and the method hurts every culture alike. (Binary changes at
    C = 3 are conservative by discreteness, an exact test's lattice: 0.028 measured over 1000
    runs with 30 % harm; continuous changes and C = 8 are nominal.)"""
    rng = np.random.default_rng(20 + C)
    rejected = defined = 0
    for r in range(400):
        if kind == "binary":
            data, direction = _simulate(rng, C, 3, 20, own=0.3, others=0.3, base=0.0), -1
        else:
            data, direction = _continuous(rng, C, 20, own=1.0, others=1.0), 1
        res = cn.compare_to_random(*data, "specificity", direction, seed=r, permutations=1000)
        assert res.test in ("uniform share", "undefined")
        defined += res.test != "undefined"
        rejected += res.p <= ALPHA
    assert defined >= 390
    assert 0.03 <= rejected / 400 <= 0.07, rejected / 400


@pytest.mark.slow
@pytest.mark.parametrize("C,floor", [(3, 0.4), (8, 0.9)])
def test_specificity_against_the_uniform_share_has_power(C, floor):
    """Random sets do nothing; the method hurts its own culture's right answers 30 % of the
    time, the others' 15 % (true share 0.5 at C = 3, 0.22 at C = 8; measured power 0.53 and
    0.97, where the old recombined ratio never rejected)."""
    rng = np.random.default_rng(30 + C)
    ps = []
    for r in range(200):
        method, draws, culture = _simulate(rng, C, 3, 20, own=0.3, others=0.15, base=0.0)
        ps.append(cn.compare_to_random(method, draws, culture, "specificity", -1, seed=r,
                                       permutations=1000).p)  # fmt: skip
    assert np.mean(np.array(ps) <= ALPHA) >= floor, np.mean(np.array(ps) <= ALPHA)


@pytest.mark.slow
@pytest.mark.parametrize("C,D,floor", [(3, 10, 0.4), (8, 3, 0.85)])
def test_specificity_against_rnd_holds_its_level_and_has_power(C, D, floor):
    """RND does something (base 0.2): null = the method is one more draw; alternative = it
    hurts its own culture's right answers 25 % more often (measured power 0.53, 0.95)."""
    rng = np.random.default_rng(40 + C)
    null, alt = [], []
    for r in range(400):
        res = cn.compare_to_random(*_simulate(rng, C, D, 20, base=0.2), "specificity", -1,
                                   seed=r, permutations=1000)  # fmt: skip
        assert res.test in ("recombination", "undefined")
        null.append(res.p)
        if r < 200:
            res = cn.compare_to_random(*_simulate(rng, C, D, 20, base=0.2, own=0.25),
                                       "specificity", -1, seed=r, permutations=1000)
            alt.append(res.p)
    null, alt = np.nan_to_num(null, nan=1.0), np.nan_to_num(alt, nan=1.0)
    assert 0.03 <= np.mean(null <= ALPHA) <= 0.07, np.mean(null <= ALPHA)
    assert np.mean(alt <= ALPHA) >= floor, np.mean(alt <= ALPHA)
