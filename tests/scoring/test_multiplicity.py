"""Holm and Benjamini-Hochberg against plain computations, the per-cell sign test against an
exact binomial written out, and the matrix's false bold cells under a simulated null."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from culture_neurons.scoring import multiplicity as M


def test_holm_by_hand_keeps_order_and_none():
    p = [0.01, None, 0.04, 0.03, float("nan")]
    got = M.holm(p)
    # sorted 0.01, 0.03, 0.04 over m = 3: 3 x 0.01, max(.., 2 x 0.03), max(.., 1 x 0.04)
    assert got == pytest.approx([0.03, None, 0.06, 0.06, None])
    assert M.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bh_against_a_plain_loop():
    rng = np.random.default_rng(0)
    p = rng.random((5, 7)) ** 3
    p[1, 2] = np.nan
    q = M.benjamini_hochberg(p)
    flat = [(x, i) for i, x in enumerate(p.ravel()) if not math.isnan(x)]
    m = len(flat)
    ranked = sorted(flat)
    want = np.full(p.size, np.nan)
    for k, (_, i) in enumerate(ranked):
        want[i] = min(min(1.0, ranked[j][0] * m / (j + 1)) for j in range(k, m))
    np.testing.assert_allclose(q.ravel(), want, rtol=1e-12, equal_nan=True)


def test_cell_sign_test_is_the_exact_binomial():
    culture = torch.tensor([0] * 12 + [1] * 5)
    change = torch.zeros(2, 17, dtype=torch.float64)
    change[0, :9] = -100.0  # 9 of 12 hurt, none helped: k = 0 ups of 9
    change[0, 9] = 100.0  # one helped: 1 up of 10
    change[1, 12:] = 0.0  # nothing changes: p = 1
    p = M.cell_p(change, culture, 2)
    want = 2 * sum(math.comb(10, i) for i in range(2)) / 2**10
    assert p[0, 0] == pytest.approx(want) and p[0, 1] == 1.0 and p[1, 0] == 1.0
    assert p[1, 1] == 1.0


def test_cell_sign_flip_on_continuous_changes():
    rng = np.random.default_rng(1)
    culture = torch.tensor([0] * 30)
    shifted = torch.tensor(rng.normal(1.0, 1.0, (1, 30)))
    assert M.cell_p(shifted, culture, 1)[0, 0] < 0.01
    centred = torch.tensor(rng.normal(0.0, 1.0, (400, 30)))
    p = M.cell_p(centred, culture, 1)[:, 0]
    assert 0.03 <= np.mean(p <= 0.05) <= 0.07  # level of the sign-flip test


@pytest.mark.slow
def test_false_bold_cells_under_the_null_are_rare():
    """No set changes anything beyond noise (C = 8, 20 items per culture, items helped or hurt
    alike with probability 0.1): a matrix with any bold cell (BH q < 0.05) in at most ~5 % of
    runs (BH controls the family-wise rate when every null holds). Bold by interval, the old
    rule, gave about 3 false bold cells per matrix (issue #22)."""
    rng = np.random.default_rng(2)
    C, n_c = 8, 20
    culture = torch.arange(C).repeat_interleave(n_c)
    any_bold = 0
    for _ in range(200):
        u = rng.random((C, C * n_c))
        change = torch.tensor(np.where(u < 0.1, -100.0, np.where(u < 0.2, 100.0, 0.0)))
        p = M.cell_p(change, culture, C)
        any_bold += (M.benjamini_hochberg(p) < 0.05).any()
    assert any_bold / 200 <= 0.07, any_bold / 200
