"""Overlap of two selections against random sets of the same sizes: hand-computed cases, the
exact hypergeometric expectation against a simulation of independent uniform sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from culture_neurons.masks import Masks
from culture_neurons.masks import set_jaccard as jaccard
from culture_neurons.selection.stability import (
    expected_jaccard,
    expected_jaccard_per_layer,
    intersection_pmf,
    overlap,
)
from culture_neurons.stats import Fingerprint

FP = Fingerprint("llama", "llama", 3, 4, 8, "silu", "0" * 64)  # 12 neurons


def test_jaccard_by_hand():
    a, b = torch.tensor([1, 2, 3, 7]), torch.tensor([3, 7, 9])
    assert jaccard(a, b) == 2 / 5  # {3, 7} of {1, 2, 3, 7, 9}
    assert jaccard(a, a) == 1.0
    assert jaccard(a, torch.tensor([0])) == 0.0
    assert math.isnan(jaccard(torch.tensor([], dtype=torch.int64),
                              torch.tensor([], dtype=torch.int64)))  # fmt: skip


def test_expected_jaccard_by_hand():
    # Two 2-sets of 4 items: P(X = 0, 1, 2) = 1/6, 4/6, 1/6 and J = 0, 1/3, 1.
    assert intersection_pmf(4, 2, 2) == pytest.approx([1 / 6, 4 / 6, 1 / 6], abs=1e-12)
    assert expected_jaccard(2, 2, 4) == pytest.approx(4 / 6 / 3 + 1 / 6, abs=1e-12)  # 7/18
    # A 1-set and a 3-set of 3 items always meet: X = 1, J = 1/3.
    assert expected_jaccard(1, 3, 3) == pytest.approx(1 / 3, abs=1e-12)
    # The whole pool twice: J = 1; one empty set: J = 0; both empty: undefined.
    assert expected_jaccard(5, 5, 5) == pytest.approx(1.0, abs=1e-12)
    assert expected_jaccard(0, 3, 10) == 0.0
    assert math.isnan(expected_jaccard(0, 0, 10))


@pytest.mark.parametrize("pool,a,b", [(10, 3, 4), (288, 14, 9), (1000, 5, 5), (5000, 60, 40)])
def test_pmf_is_the_hypergeometric(pool, a, b):
    p = intersection_pmf(pool, a, b)
    k = np.arange(len(p))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert (p * k).sum() == pytest.approx(a * b / pool, rel=1e-10)  # E|A & B| = a b / pool


def _simulated(pools_sizes, draws: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of J over independent uniform sets (a plain simulation):
    ``pools_sizes`` lists (pool, a, b) per layer, the layers' neurons kept apart."""
    gen = np.random.default_rng(seed)
    js = np.empty(draws)
    for d in range(draws):
        inter = union = 0
        for pool, a, b in pools_sizes:
            A = set(gen.choice(pool, a, replace=False).tolist())
            B = set(gen.choice(pool, b, replace=False).tolist())
            inter += len(A & B)
            union += len(A | B)
        js[d] = inter / union
    return js.mean(), js.std(ddof=1) / math.sqrt(draws)


@pytest.mark.parametrize("pool,a,b", [(20, 4, 6), (288, 14, 14), (500, 30, 10)])
def test_expectation_matches_simulation(pool, a, b):
    mean, se = _simulated([(pool, a, b)], 20000, seed=pool + a)
    exact = expected_jaccard(a, b, pool)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # The plain ratio of expectations is not it (the simulation tells them apart here).
    if pool == 20:
        naive = a * b / pool / (a + b - a * b / pool)
        assert abs(mean - naive) > 4 * se


def test_per_layer_expectation_matches_simulation():
    layers = [(30, 3, 2), (30, 0, 4), (30, 6, 5)]
    mean, se = _simulated(layers, 20000, seed=3)
    exact = expected_jaccard_per_layer([a for _, a, _ in layers], [b for *_, b in layers], 30)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_overlap_of_two_selections_by_hand():
    a = Masks.from_sets(["x", "y", "z"], [torch.tensor([0, 1, 2]), torch.tensor([5]),
                                          torch.tensor([], dtype=torch.int64)], FP)  # fmt: skip
    b = Masks.from_sets(["y", "x", "z"], [torch.tensor([5]), torch.tensor([1, 2, 3, 4]),
                                          torch.tensor([], dtype=torch.int64)], FP)  # fmt: skip
    got = overlap(a, b)
    assert got["names"] == ["x", "y", "z"]
    assert got["jaccard"][:2] == [2 / 5, 1.0] and got["jaccard"][2] is None
    assert got["sizes"] == [[3, 4], [1, 1], [0, 0]]
    assert got["expected"][0] == pytest.approx(expected_jaccard(3, 4, 12))
    assert got["expected"][1] == pytest.approx(1 / 12)  # two 1-sets meet with chance 1/12
    assert got["mean"] == pytest.approx((2 / 5 + 1) / 2)  # z undefined: left out
    assert got["pool"] == 12
    same = overlap(a, a)
    assert same["jaccard"][:2] == [1.0, 1.0]
    per_layer = overlap(a, b, per_layer=True)  # x: layer 0 {0,1,2} vs {1,2,3} + layer 1 {4}
    assert per_layer["expected"][0] == pytest.approx(
        expected_jaccard_per_layer([3, 0, 0], [3, 1, 0], 4))
    assert per_layer["pool"] == "4 per layer"
