"""The paired bootstrap and its intervals, against hand computations (loops over the same index
draw, an exact enumeration of every resample) and against the null they must respect."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.scoring import uncertainty as U
from culture_neurons.scoring.metrics import summaries


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
    summ = summaries(delta.permute(1, 0, 2), sign=-1)  # matrices [B, S, C]; harm = a drop
    for b in range(200):
        d = hand_delta[:, b, :]
        assert summ["self"][b].item() == pytest.approx((d[0, 0] + d[1, 1]) / 2, abs=1e-12)
        assert summ["cross"][b].item() == pytest.approx((d[0, 1] + d[1, 0]) / 2, abs=1e-12)
        s, x = (d[0, 0] + d[1, 1]) / 2, (d[0, 1] + d[1, 0]) / 2
        # share of the harm, clipped to [0, 1]; no net harm: undefined
        want = min(1.0, max(0.0, s / (s + x))) if -(s + x) > 1e-9 else math.nan
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


@pytest.mark.slow
@pytest.mark.parametrize("C", [3, 8])
def test_gap_interval_covers_at_20_items_per_culture(C):
    """Known truth: set s hurts an item of culture c with probability p[s, c] (own culture
    0.25, others 0.05-0.15); the 95 % (expanded percentile) interval of the gap must cover the true gap in 93-97 % of
    400 runs (both sides: too narrow and too wide are defects)."""
    rng = np.random.default_rng(C)
    n_c = 20
    culture = torch.arange(C).repeat_interleave(n_c)
    prob = rng.uniform(0.05, 0.15, (C, C))
    np.fill_diagonal(prob, 0.25)
    off = ~np.eye(C, dtype=bool)
    truth = -100 * (prob.diagonal().mean() - prob[off].mean())
    covered = 0
    for r in range(400):
        hurt = rng.random((C, C * n_c)) < prob[:, culture.numpy()]
        change = torch.tensor(-100.0 * hurt)
        boot = U.Bootstrap.draw(culture, C, resamples=500, seed=r)
        gap = summaries(boot.culture_means(change).permute(1, 0, 2))["gap"]  # [B]
        lo, hi = U.interval(gap, items=n_c).tolist()
        covered += lo <= truth <= hi
    assert 0.93 <= covered / 400 <= 0.97, covered / 400


def test_expanded_tail_by_hand():
    assert U.expanded_tail(0.95) == pytest.approx(0.025) == U.expanded_tail(0.95, items=1)
    z = math.sqrt(20 / 19) * 2.0930  # t quantile, 19 df
    want = 0.5 * math.erfc(z / math.sqrt(2))
    assert U.expanded_tail(0.95, items=20) == pytest.approx(want, rel=2e-3)
    assert U.expanded_tail(0.95, items=5) < U.expanded_tail(0.95, items=20) < 0.025


def test_interval_flags_count_small_cultures_zero_widths_and_undefined_resamples():
    cis = {"delta": [[[0.0, 0.0], [-1.0, 2.0]], [[None, None], [3.0, 3.0]]], "flip": None}
    flags = U.interval_flags([25, 12], cis, {"specificity": 0.25})
    assert flags["reliable"] is False and flags["smallest_culture"] == 12
    assert flags["zero_width_cells"] == {"delta": 2}  # [0, 0] and [3, 3]; undefined not
    assert flags["undefined_share"] == {"specificity": 0.25}
    assert U.interval_flags([20, 30], {}, {})["reliable"] is True
