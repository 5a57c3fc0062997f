"""The paired bootstrap and the RND p-value, against hand computations (loops over the same index
draw, an exact enumeration of every resample) and against the null they must respect."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.scoring import uncertainty as U
from culture_neurons.scoring.metrics import row_parts, summaries


def _fixed_case():
    """7 items of 2 cultures (4 + 3, interleaved), predictions of the full model and 2 sets."""
    culture = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    full = torch.tensor([0, 1, 2, 0, 0, 2, 2])  # right on items 0 1 2 4 6
    pred = torch.tensor([[1, 1, 2, 0, 3, 2, 2],  # set 0: hurts items 0 and 4
                         [0, 1, 3, 3, 0, 1, 2]])  # set 1: items 2 (hurt), 3 and 5 (helped)
    return culture, labels, full, pred


def test_resamples_are_stratified_seeded_and_keep_every_culture_count():
    culture = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 2])
    boot = U.Bootstrap.draw(culture, C=4, resamples=50, seed=3)  # culture 3 has no items
    assert boot.index.shape == (50, 11) and boot.resamples == 50
    # Slot j holds an item of culture[j]: each culture keeps exactly its own item count.
    assert torch.equal(culture[boot.index], culture.expand(50, -1))
    assert torch.equal(boot.weights.sum(1), torch.full((50,), 11.0, dtype=torch.float64))
    for c in range(3):
        assert torch.equal(boot.weights[:, culture == c].sum(1),
                           torch.full((50,), float((culture == c).sum()), dtype=torch.float64))
    again = U.Bootstrap.draw(culture, C=4, resamples=50, seed=3)
    assert torch.equal(again.index, boot.index)
    assert not torch.equal(U.Bootstrap.draw(culture, C=4, resamples=50, seed=4).index, boot.index)
    # Every item of a culture is drawn at some point (uniform over its items, not its first).
    for c in range(3):
        assert set(boot.index[:, culture == c].flatten().tolist()) == set(
            torch.nonzero(culture == c).flatten().tolist())
    with pytest.raises(UsageError, match="resamples"):
        U.Bootstrap.draw(culture, C=4, resamples=0)


def test_resampled_means_and_intervals_match_a_hand_computation():
    culture, labels, full, pred = _fixed_case()
    boot = U.Bootstrap.draw(culture, C=2, resamples=200, seed=0)
    correct = (torch.cat([full[None], pred]) == labels).double()  # [3, n]
    got = boot.culture_means(correct)  # [3, B, C]
    delta = got[1:] - got[0]  # [2, B, C] resampled delta of each set (fractions)
    got_ci = U.interval(delta.permute(0, 2, 1))  # [S, C, 2]
    # Hand: loop over resamples and slots of the same index draw.
    idx = boot.index.tolist()
    hand = np.zeros((3, 200, 2))
    for r in range(3):
        for b in range(200):
            for c in range(2):
                slots = [j for j in range(7) if int(culture[j]) == c]
                hand[r, b, c] = sum(float(correct[r, idx[b][j]]) for j in slots) / len(slots)
    assert np.allclose(got.numpy(), hand, atol=1e-12)  # sums of a few 0/1: exact in fp64
    hand_delta = hand[1:] - hand[0]
    for s in range(2):
        for c in range(2):
            lo, hi = np.percentile(hand_delta[s, :, c], [2.5, 97.5])
            assert got_ci[s, c].tolist() == pytest.approx([lo, hi], abs=1e-12)
    # Summaries per resample, by hand: self = mean diagonal, cross = mean off-diagonal.
    summ = summaries(delta.permute(1, 0, 2))  # matrices [B, S, C]
    for b in range(200):
        d = hand_delta[:, b, :]
        assert summ["self"][b].item() == pytest.approx((d[0, 0] + d[1, 1]) / 2, abs=1e-12)
        assert summ["cross"][b].item() == pytest.approx((d[0, 1] + d[1, 0]) / 2, abs=1e-12)
        s, x = (d[0, 0] + d[1, 1]) / 2, (d[0, 1] + d[1, 0]) / 2
        want = s / (s + x) if abs(s + x) > 1e-9 else math.nan  # no net effect: undefined
        assert summ["specificity"][b].item() == pytest.approx(want, nan_ok=True)


def test_bootstrap_distribution_matches_exact_enumeration():
    """Two cultures of 3 items: all 3^3 * 3^3 resamples are equally likely; the resampled
    self of a fixed delta matrix has the mean and sd of the exact enumeration."""
    culture = torch.tensor([0, 0, 0, 1, 1, 1])
    d = torch.tensor([[-1.0, 0.0, -1.0, 0.0, 1.0, 0.0],  # set 0: per-item change
                      [0.0, 0.0, 1.0, -1.0, -1.0, 0.0]])  # set 1
    exact = []
    for a in itertools.product(range(3), repeat=3):
        for b in itertools.product(range(3), repeat=3):
            m0 = [float(d[0, list(a)].mean()), float(d[0, [3 + i for i in b]].mean())]
            m1 = [float(d[1, list(a)].mean()), float(d[1, [3 + i for i in b]].mean())]
            exact.append((m0[0] + m1[1]) / 2)  # self = mean diagonal
    exact = np.array(exact)
    boot = U.Bootstrap.draw(culture, C=2, resamples=40000, seed=1)
    self_b = summaries(boot.culture_means(d).permute(1, 0, 2))["self"].numpy()
    # Monte Carlo error with 40000 resamples: sd / sqrt(B) ~ 0.001 for the mean, ~0.4 % for
    # the sd; the tolerances are ~5 of those.
    assert self_b.mean() == pytest.approx(exact.mean(), abs=0.006)
    assert self_b.std() == pytest.approx(exact.std(), rel=0.02)


def test_intervals_shrink_as_items_grow():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-1, 2, (3, 40), generator=gen).double()  # per-item changes of 3 sets
    culture = torch.arange(40) % 3
    widths = []
    for k in (1, 4, 16):  # every item repeated k times: same means, k times the items
        boot = U.Bootstrap.draw(culture.repeat(k), C=3, resamples=2000, seed=0)
        self_b = summaries(boot.culture_means(base.repeat(1, k)).permute(1, 0, 2))["self"]
        lo, hi = U.interval(self_b).tolist()
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # Standard error ~ 1 / sqrt(items): a quarter of the width with 16x the items (the 25 %
    # slack covers the discreteness of a 40-item bootstrap and its Monte Carlo error).
    assert widths[1] / widths[0] == pytest.approx(0.5, rel=0.25)
    assert widths[2] / widths[0] == pytest.approx(0.25, rel=0.25)


def test_interval_of_undefined_values():
    x = torch.tensor([[1.0, 2.0, float("nan"), 3.0], [float("nan")] * 4])
    ci = U.interval(x)
    assert ci[0].tolist() == pytest.approx(np.nanpercentile([1, 2, 3], [2.5, 97.5]).tolist())
    assert torch.isnan(ci[1]).all()
    assert torch.isnan(U.interval(torch.full((4,), float("nan")))).all()  # one summary, [B]


def test_p_value_by_hand_recombining_rows():
    """C = 2 cultures, D = 1 draw: the 4 recombinations (row 0 from the method or the draw,
    row 1 likewise) enumerated by hand, on each of 2 resamples."""
    method = torch.tensor([[[-5.0, -1.0], [0.0, -3.0]],   # resample 0: gap (-8 - -1) / 2
                           [[-2.0, 0.0], [-1.0, -1.0]]])  # resample 1
    draw = torch.tensor([[[-1.0, 0.0], [-1.0, -4.0]],
                         [[0.0, -1.0], [0.0, -2.0]]])
    got = U.p_value(row_parts(method), [row_parts(draw)], "gap", U.LOWER)
    want = []
    for b in range(2):
        rows = {0: (method[b], draw[b]), 1: (method[b], draw[b])}
        gaps = []
        for j0 in range(2):
            for j1 in range(2):
                m = torch.stack([rows[0][j0][0], rows[1][j1][1]])  # recombined matrix
                gaps.append(((m[0, 0] + m[1, 1]) / 2 - (m[0, 1] + m[1, 0]) / 2).item())
        own = gaps[0]  # j0 = j1 = 0: the method itself
        want.append(sum(g <= own for g in gaps) / 4)
    assert got == pytest.approx(sum(want) / 2)
    two = U.p_value(row_parts(method), [row_parts(draw)], "gap", U.TWO_SIDED)
    high = U.p_value(row_parts(method), [row_parts(draw)], "gap", U.HIGHER)
    assert two == pytest.approx(min(1.0, 2 * min(got, high)))


def test_p_value_floor_and_undefined_values():
    gen = torch.Generator().manual_seed(0)
    C, B, D = 3, 5, 2
    null = [row_parts(torch.rand(B, C, C, generator=gen)) for _ in range(D)]
    far = torch.full((B, C, C), 0.0)
    far[:, torch.arange(C), torch.arange(C)] = -50.0  # far below every random row
    # Exact enumeration ((D + 1)^C = 27 <= permutations): the floor is 1 / 27.
    assert U.p_value(row_parts(far), null, "gap", U.LOWER) == pytest.approx(1 / 27)
    assert U.resolution(D, C) == pytest.approx(1 / 27)
    # Random recombinations: the floor is 1 / (permutations + 1), never 0.
    p = U.p_value(row_parts(far), null, "gap", U.LOWER, permutations=10)
    assert p == pytest.approx(1 / 11) and U.resolution(D, C, permutations=10) == 1 / 11
    assert U.p_value(row_parts(far), [], "gap", U.LOWER) is None
    undefined = torch.full((B, C, C), float("nan"))
    assert U.p_value(row_parts(undefined), null, "gap", U.LOWER) is None


def _simulated(gen, sets: int, C: int, n: int, set_sd: float, boot: U.Bootstrap):
    """Resampled delta matrices [sets, B, C, C] of ``sets`` random sets of one process: each
    set has a true per-cell effect (spread ``set_sd`` between sets) and items flip at random
    around it."""
    true = -0.05 + set_sd * torch.randn(sets, C, C, generator=gen)  # true accuracy change
    culture = boot.culture
    base = (torch.rand(n, generator=gen) < 0.7).double()  # the full model's right answers
    p_hurt = (0.1 - true.clamp(max=0)).clamp(0, 1)[:, :, culture]  # [sets, C(s), n]
    p_help = (0.1 + true.clamp(min=0)).clamp(0, 1)[:, :, culture]
    u = torch.rand(sets, C, n, generator=gen)
    changed = torch.where(base.bool(), -(u < p_hurt).double(), (u < p_help).double())
    return boot.culture_means(changed).permute(0, 2, 1, 3)  # [sets, B, C(s), C]


@pytest.mark.parametrize("set_sd", [0.0, 0.1])  # item noise only / large set-to-set spread
def test_p_values_of_a_method_that_is_random_are_not_systematically_small(set_sd):
    """The 'method' is one more draw of the RND process: over 200 seeds its p-values spread
    over (0, 1] (mean ~ 0.5), and p <= 0.1 no more often than 10 % (+ Monte Carlo slack)."""
    C, n, D = 4, 40, 4
    culture = torch.arange(n) % C
    ps = {"gap": [], "specificity": []}
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        boot = U.Bootstrap.draw(culture, C, resamples=100, seed=seed)
        parts = [row_parts(m) for m in _simulated(gen, D + 1, C, n, set_sd, boot)]
        ps["gap"].append(U.p_value(parts[0], parts[1:], "gap", U.LOWER, seed=seed))
        ps["specificity"].append(U.p_value(parts[0], parts[1:], "specificity", U.HIGHER,
                                           seed=seed))  # fmt: skip
    for key, values in ps.items():
        values = np.array(values)
        assert 0.38 < values.mean() < 0.65, (key, values.mean())  # uniform: 0.5
        # Under the null P(p <= 0.1) <= 0.1; 200 seeds: sd of the share ~0.021, slack ~2.5 sd.
        assert (values <= 0.1).mean() <= 0.15, (key, np.sort(values)[:30])


def test_a_selective_method_gets_a_small_p_value():
    C, n, D = 4, 120, 5
    culture = torch.arange(n) % C
    gen = torch.Generator().manual_seed(0)
    boot = U.Bootstrap.draw(culture, C, resamples=300, seed=0)
    null = [row_parts(m) for m in _simulated(gen, D, C, n, 0.02, boot)]
    # The method flips a third of its own culture's right answers and nothing else.
    base = (torch.rand(n, generator=gen) < 0.7).double()
    own = torch.zeros(C, n)
    for s in range(C):
        hit = (culture == s) & base.bool() & (torch.rand(n, generator=gen) < 0.35)
        own[s, hit] = -1.0
    method = row_parts(boot.culture_means(own).permute(1, 0, 2))
    assert U.p_value(method, null, "gap", U.LOWER) < 0.01
    assert U.p_value(method, null, "specificity", U.HIGHER) < 0.01
