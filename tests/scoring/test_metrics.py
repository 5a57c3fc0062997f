"""Summaries of an ablation matrix: self, cross, gap and specificity, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from culture_neurons.scoring.metrics import summaries


def test_summaries_by_hand_and_specificity_ignores_scale_and_is_oriented():
    m = torch.tensor([[-6.0, -1.0, 0.0], [-2.0, -9.0, -1.0], [0.0, -2.0, -3.0]])
    out = summaries(m, sign=-1)  # accuracy: a drop is the harm
    s, c = (-6 - 9 - 3) / 3, (-1 + 0 - 2 - 1 + 0 - 2) / 6
    assert out["self"].item() == pytest.approx(s) and out["cross"].item() == pytest.approx(c)
    assert out["gap"].item() == pytest.approx(s - c)
    assert out["specificity"].item() == pytest.approx(18 / 24)  # diagonal / total
    for k in (3.0, 0.5):  # scaled effects: same specificity, scaled gap
        scaled = summaries(k * m, sign=-1)
        assert scaled["specificity"].item() == pytest.approx(18 / 24)
        assert scaled["gap"].item() == pytest.approx(k * (s - c))
    # the same changes as gains: no harm to share (undefined), never the same share again
    assert math.isnan(summaries(-m, sign=-1)["specificity"].item())
    assert summaries(-m, sign=1)["specificity"].item() == pytest.approx(18 / 24)
    # the own culture hurt, the others helped more than 0: the share is clipped to 1
    helped = torch.tensor([[-6.0, 1.0], [1.0, -6.0]])
    assert summaries(helped, sign=-1)["specificity"].item() == 1.0
    # the own culture helped while the others are hurt: clipped to 0, not negative
    own_helped = torch.tensor([[2.0, -6.0], [-6.0, 2.0]])
    assert summaries(own_helped, sign=-1)["specificity"].item() == 0.0
    m[0, 2] = float("nan")  # a cell without items is left out of the mean
    assert summaries(m, sign=-1)["cross"].item() == pytest.approx((-1 - 2 - 1 + 0 - 2) / 5)
    one = summaries(torch.tensor([[-4.0]]))
    assert one["self"].item() == -4.0 and math.isnan(one["gap"].item())


def test_resampled_matrices_are_the_matrices_of_each_resample():
    """matrices(boot=...) on resample b equals matrices() of the items that resample holds:
    the full model and every set see the same resampled items (paired)."""
    from culture_neurons.scoring.metrics import matrices
    from culture_neurons.scoring.uncertainty import Bootstrap

    gen = torch.Generator().manual_seed(0)
    n, S, C = 23, 3, 3
    culture = torch.randint(0, C, (n,), generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    full = torch.randint(-1, 4, (n,), generator=gen)
    pred = torch.randint(-1, 4, (S, n), generator=gen)
    boot = Bootstrap.draw(culture, C, resamples=30, seed=5)
    got = matrices(full, pred, culture, C, labels, boot=boot)
    assert got["accuracy"].shape == (30, S, C) and got["accuracy_full"].shape == (30, C)
    for b in range(30):
        i = boot.index[b]  # slot j holds item i[j], of culture culture[j]
        want = matrices(full[i], pred[:, i], culture, C, labels[i])
        for key in ("accuracy_full", "accuracy", "delta", "flip"):
            assert torch.allclose(got[key][b], want[key], atol=1e-9, equal_nan=True), (key, b)
