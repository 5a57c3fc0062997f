"""Totals: per-layer [C, N] totals allocated where a call adds, read back only by stats(), and
a continuation from a checkpoint that equals, bit for bit, a run never interrupted."""

from __future__ import annotations

import pytest
import torch

from culture_neurons.errors import StatsMismatchError
from culture_neurons.instrument import Totals
from culture_neurons.instrument import functional as F
from culture_neurons.stats import Fingerprint, Stats

CULTURES = ["ja", "mx", "ng"]
FP = Fingerprint("llama", "llama", 4, 11, 8, "silu", "test")  # L = 4, N = 11


def forwards(n: int, seed: int = 0):
    """n forwards' worth of (layer, a [2, 7, N], culture [2], weights [2, 7]), random."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        culture = torch.randint(-1, len(CULTURES), (2,), generator=gen)
        weights = (torch.rand(2, 7, generator=gen) > 0.3).long()
        for layer in range(FP.num_layers):
            yield layer, torch.randn(2, 7, FP.num_neurons, generator=gen) * 3, culture, weights


def record(totals: Totals, data) -> None:
    for layer, a, culture, weights in data:
        if layer == 0:
            F.count_tokens(totals, culture, weights)
            F.count_items(totals, culture)
        F.accumulate(totals, layer, a, culture, weights)


def test_layers_are_allocated_where_and_when_a_call_first_adds():
    totals = Totals(CULTURES, FP)
    assert "no device yet" in repr(totals)
    K, S, Q = totals.layer(2, "cpu")
    assert (K.dtype, S.dtype, Q.dtype) == (torch.int64, torch.float64, torch.float64)
    assert K.shape == S.shape == Q.shape == (3, 11) and K.is_contiguous() and S.is_contiguous()
    assert totals.layer(2, torch.device("cpu"))[0] is K, "one set of totals per (layer, device)"
    K += 5
    got = totals.stats()
    assert int(got.K[:, 2].sum()) == 5 * 33 and int(got.K[:, [0, 1, 3]].abs().sum()) == 0
    got.K += 1  # stats() is a copy: the totals do not move
    assert int(totals.layer(2, "cpu")[0].sum()) == 5 * 33


def test_reset_zeroes_in_place_so_handed_out_totals_stay_valid():
    totals = Totals(CULTURES, FP)
    record(totals, forwards(2))
    K, S, Q = totals.layer(1, "cpu")
    T, items = totals.counts("cpu")
    assert int(K.sum()) > 0 and int(T.sum()) > 0
    totals.reset()
    assert totals.layer(1, "cpu")[0] is K and int(K.abs().sum()) == 0 and float(S.abs().sum()) == 0
    assert int(T.sum()) == 0 and int(items.sum()) == 0


@pytest.mark.parametrize("allocated_before", [False, True])
def test_start_from_a_checkpoint_equals_one_uninterrupted_run(allocated_before):
    whole = Totals(CULTURES, FP)
    record(whole, forwards(5))
    first = Totals(CULTURES, FP)
    record(first, (f for i, f in enumerate(forwards(5)) if i < 3 * FP.num_layers))
    checkpoint = first.stats()
    resumed = Totals(CULTURES, FP)
    if allocated_before:  # the Instrument hands its layers' totals out at attach
        handed = [resumed.layer(layer, "cpu") for layer in range(FP.num_layers)]
    resumed.start_from(checkpoint)
    checkpoint.K += 1000  # the caller's stats may change afterwards: a snapshot was taken
    record(resumed, (f for i, f in enumerate(forwards(5)) if i >= 3 * FP.num_layers))
    want, got = whole.stats(), resumed.stats()
    for name in ("T", "K", "S", "Q", "items"):  # same sums in the same order: bit for bit
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    if allocated_before:
        assert all(resumed.layer(layer, "cpu")[0] is handed[layer][0] for layer in range(4))


def test_a_layer_no_call_reached_keeps_its_checkpoint_values():
    base = Stats.zeros(CULTURES, FP)
    base.K[:, 3] = 7
    base.T += 2
    totals = Totals.like(base)
    totals.start_from(base)
    got = totals.stats()
    assert torch.equal(got.K, base.K) and torch.equal(got.T, base.T)


def test_start_from_refuses_other_cultures_or_options():
    totals = Totals(CULTURES, FP, options={"items": "correct"})
    with pytest.raises(StatsMismatchError, match="cultures"):
        totals.start_from(Stats.zeros(["ja", "mx"], FP, options={"items": "correct"}))
    with pytest.raises(StatsMismatchError, match="options"):
        totals.start_from(Stats.zeros(CULTURES, FP, options={"items": "all"}))
