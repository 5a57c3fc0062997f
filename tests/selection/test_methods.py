"""Selectors: hand-computed sets on a 3 x 2 x 4 example, properties on random stats, and the
identity of both ranking backends.

The hand example uses T = 16 so that every P = K / 16, sum and mean below is exact in binary:
the expected sets then follow from the integer K alone (written out per neuron below).
"""

from __future__ import annotations

import pytest
import torch

from culture_neurons.errors import DataError, StatsMismatchError, UsageError
from culture_neurons.masks import Masks
from culture_neurons.selection import topk
from culture_neurons.selection.methods import METHODS, cas, lap, lape, mad, rnd, select
from culture_neurons.stats import Fingerprint, Stats

BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(topk._cpp() is None, reason="_C not built")),
]


def fingerprint(L: int, N: int) -> Fingerprint:
    return Fingerprint("test", "test", L, N, 8, "silu", "0" * 8)


def make_stats(K: torch.Tensor, T: list[int], S: torch.Tensor | None = None) -> Stats:
    C, L, N = K.shape
    st = Stats.zeros([f"c{i}" for i in range(C)], fingerprint(L, N))
    st.K.copy_(K)
    st.T.copy_(torch.tensor(T))
    st.S.copy_(K.double() if S is None else S)
    return st


# K[c, l, n]; flat neuron f = l * 4 + n. Per neuron, K over cultures (c0, c1, c2):
#   f0 (9,1,3)  f1 (1,8,2)  f2 (5,5,4)  f3 (0,0,0)  f4 (2,2,9)  f5 (2,6,2)  f6 (7,1,6)  f7 (3,3,3)
HAND_K = torch.tensor(
    [
        [[9, 1, 5, 0], [2, 2, 7, 3]],
        [[1, 8, 5, 0], [2, 6, 1, 3]],
        [[3, 2, 4, 0], [9, 2, 6, 3]],
    ]
)


@pytest.fixture
def hand() -> Stats:
    return make_stats(HAND_K, [16, 16, 16])


def sets(m: Masks) -> list[list[int]]:
    return [m.flat_of(s).tolist() for s in range(len(m))]


def random_stats(C=5, L=3, N=200, seed=0, T=None) -> Stats:
    """Binomial-ish counts around a per-neuron base rate, so cultures correlate as in models."""
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(500, 2000, (C,), generator=g) if T is None else torch.tensor(T)
    base = torch.rand(1, L, N, generator=g) * 0.4
    jitter = torch.exp(torch.randn(C, L, N, generator=g, dtype=torch.float64) * 0.3)
    K = (T.view(-1, 1, 1) * (base * jitter).clamp(max=1)).long()
    S = torch.randn(C, L, N, generator=g, dtype=torch.float64) * 10
    return make_stats(K, T.tolist(), S)


# -- hand-computed --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cas_hand(hand, backend):
    # argmax / margin (K units): f0 c0 6, f1 c1 6, f2 c0 0 (tie c0=c1 -> c0), f3 c0 0,
    # f4 c2 7, f5 c1 4, f6 c0 1, f7 c0 0. c2 has one candidate only: its set is not padded.
    assert sets(cas(hand, ratio=0.25, backend=backend)) == [[0, 6], [1, 5], [4]]
    # k = 4: c0 takes the margin-0 ties f2, f3 (lower index) over f7.
    assert sets(cas(hand, ratio=0.5, backend=backend)) == [[0, 2, 3, 6], [1, 5], [4]]
    # per layer, k = 2 of each layer's 4.
    pl = cas(hand, ratio=0.5, per_layer=True, backend=backend)
    assert sets(pl) == [[0, 2, 6, 7], [1, 5], [4]]
    assert pl.layer_counts().tolist() == [[2, 2], [1, 1], [0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cas_uses_P_not_K(backend):
    # Same K as the hand example but culture 0 counted over twice the tokens: its P halves,
    # in K/16 units f0 (4.5, 1, 3) stays c0 (margin 1.5), f2 (2.5, 5, 4) and f7 (1.5, 3, 3)
    # move to c1, f6 (3.5, 1, 6) to c2; c0 keeps f0 and its margin-0 f3.
    st = make_stats(HAND_K, [32, 16, 16])
    assert sets(cas(st, ratio=0.25, backend=backend)) == [[0, 3], [1, 5], [4, 6]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lap_hand(hand, backend):
    assert sets(lap(hand, ratio=0.25, backend=backend)) == [[0, 6], [1, 5], [4, 6]]
    # k = 4; c2's fourth place is a tie of f0 and f7 at 3: f0 wins by index.
    assert sets(lap(hand, ratio=0.5, backend=backend)) == [[0, 2, 6, 7], [1, 2, 5, 7], [0, 2, 4, 6]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mad_hand(hand, backend):
    # S = K, so M = P. mean contrast, score = K[c] - (sum - K[c]) / 2.
    assert sets(mad(hand, ratio=0.25, backend=backend)) == [[0, 6], [1, 5], [4, 6]]
    assert sets(mad(hand, ratio=0.5, backend=backend)) == [[0, 2, 3, 6], [1, 2, 3, 5], [3, 4, 6, 7]]
    # max contrast: c2 = (f4 7, then f3 and f7 at 0 -> f3).
    got = mad(hand, ratio=0.25, contrast="max", backend=backend)
    assert sets(got) == [[0, 6], [1, 5], [3, 4]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lape_hand(hand, backend):
    # 24 P values (K): 0 0 0 1 1 1 2 2 2 2 2 3 3 3 3 4 5 5 6 6 7 8 9 9.
    # filter_rate 0.75 -> rank round(18) -> 5: survivors have a K above 5: f0 f1 f4 f5 f6.
    # Entropies: f1 .760 < f0 .790 < f4 .830 < f6 .898 < f5 .950.
    m = lape(hand, top_rate=0.25, filter_rate=0.75, bar_ratio=0.75, backend=backend)
    assert sets(m) == [[0], [1], []]  # kept f1, f0; bar 5: f1 -> c1, f0 -> c0
    assert m.options["filter_value"] == 5 / 16 and m.options["kept"] == 2
    # Keep 4 (f1 f0 f4 f6); bar_ratio 0.5 -> rank 12 -> 3: f6 (7, 1, 6) goes to c0 and c2.
    m = lape(hand, top_rate=0.5, filter_rate=0.75, bar_ratio=0.5, backend=backend)
    assert sets(m) == [[0, 6], [1], [4, 6]]
    assert m.options["bar_value"] == 3 / 16


def test_lape_default_filter_drops_everything_here(hand):
    # rank round(22.8) = 23 -> 9/16: no P is strictly above it, so nothing survives.
    m = lape(hand)
    assert m.sizes().tolist() == [0, 0, 0] and m.options["kept"] == 0


# -- properties on random stats --------------------------------------------------------------------
def test_cas_gives_each_neuron_to_its_argmax_only():
    st = random_stats(C=6, L=3, N=300, seed=1)
    m = cas(st, ratio=0.05)
    owner = torch.argmax(st.P.view(6, -1), dim=0)  # first maximum on ties
    seen = torch.zeros(3 * 300, dtype=torch.int64)
    for c in range(6):
        f = m.flat_of(c)
        seen[f] += 1
        assert bool((owner[f] == c).all()), f"culture {c} got a neuron it is not argmax of"
    assert int(seen.max()) <= 1
    assert m.sizes().tolist() == [45] * 6


def test_cas_normalize_ranks_normalised_margin():
    st = random_stats(C=4, L=2, N=100, seed=2)
    m = cas(st, ratio=0.1, normalize=True)
    P = st.P.view(4, -1)
    Pn = torch.nan_to_num(P / P.sum(0, keepdim=True))  # 0 where no culture fires
    top = Pn.topk(2, dim=0).values
    margin = top[0] - top[1]
    owner = Pn.argmax(0)
    for c in range(4):
        cand = torch.nonzero(owner == c).squeeze(1)
        order = sorted(cand.tolist(), key=lambda f: (-float(margin[f]), f))[:20]
        assert m.flat_of(c).tolist() == sorted(order)


def test_lap_ignores_other_cultures():
    st = random_stats(C=4, L=2, N=150, seed=3)
    before = lap(st, ratio=0.1)
    other = st.clone()
    other.K[1:] = torch.randint(0, 500, other.K[1:].shape)
    other.T[1:] = 500
    after = lap(other, ratio=0.1)
    assert torch.equal(before.flat_of(0), after.flat_of(0))
    assert not torch.equal(before.flat_of(1), after.flat_of(1))


def lape_reference(st, top_rate, filter_rate, bar_ratio):
    """Straight from Tang et al.'s description with plain sorts (no topk.py)."""
    P = st.P
    C, L, N = P.shape
    Pn = P / P.sum(0, keepdim=True)
    Pn[torch.isnan(Pn)] = 0
    H = -(Pn * torch.where(Pn > 0, Pn.log(), 0.0)).sum(0).view(-1)
    ordered = P.reshape(-1).sort().values
    filt = ordered[round(P.numel() * filter_rate) - 1]
    bar = ordered[round(P.numel() * bar_ratio) - 1]
    alive = (P > filt).any(0).view(-1)
    cand = torch.nonzero(alive).squeeze(1)
    order = torch.sort(H[cand], stable=True).indices  # ties stay in flat-index order
    kept = cand[order][: round(L * N * top_rate)]
    return [sorted(kept[P.view(C, -1)[c, kept] > bar].tolist()) for c in range(C)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rates", [(0.01, 0.95, 0.95), (0.05, 0.9, 0.97), (0.2, 0.5, 0.8)])
def test_lape_matches_reference(rates, backend):
    st = random_stats(C=7, L=4, N=250, seed=4)
    got = lape(st, *rates, backend=backend)
    assert sets(got) == lape_reference(st, *rates)


def test_rnd_sizes_and_seeds():
    st = random_stats(C=4, L=3, N=120, seed=5)
    ref = cas(st, ratio=0.05, per_layer=False)
    a = rnd(st, like=ref, seed=7)
    assert torch.equal(a.sizes(), ref.sizes())
    assert a == rnd(st, like=ref, seed=7)
    assert a != rnd(st, like=ref, seed=8)
    draws = rnd(st, like=ref, seed=7, draws=3)
    assert len(draws) == 3 and draws[0] == a and draws[1] != draws[2]
    assert all(torch.equal(d.sizes(), ref.sizes()) for d in draws)
    per_layer = rnd(st, like=cas(st, ratio=0.05), per_layer=True, seed=1)
    assert torch.equal(per_layer.layer_counts(), cas(st, ratio=0.05).layer_counts())
    plain = rnd(st, ratio=0.1)
    assert plain.sizes().tolist() == [36] * 4
    with pytest.raises(UsageError, match="not both"):
        select(st, "rnd", 0.1, like=ref)


def test_rnd_refuses_masks_of_another_model():
    st = random_stats(L=3, N=120)
    other = random_stats(L=2, N=120)
    with pytest.raises(StatsMismatchError, match="num_layers"):
        rnd(st, like=lap(other))


# -- both backends, every selector ----------------------------------------------------------------
@pytest.mark.skipif(topk._cpp() is None, reason="_C not built")
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize(
    "method,options",
    [("cas", {}), ("cas", {"normalize": True}), ("lap", {}), ("lape", {}), ("mad", {}),
     ("mad", {"contrast": "max"})],
)  # fmt: skip
def test_backends_identical(method, options, per_layer):
    st = random_stats(C=9, L=5, N=400, seed=6)
    # Quantised K makes many exact ties, the case where tie rules matter.
    st.K.copy_((st.K // 20) * 20)
    for ratio in (0.003, 0.05):
        a = select(st, method, ratio, per_layer, backend="cpp", **options)
        b = select(st, method, ratio, per_layer, backend="torch", **options)
        assert a == b, (method, options, per_layer, ratio)


# -- the entry point and errors -------------------------------------------------------------------
def test_select_entry_point(hand):
    assert METHODS == ("cas", "lap", "lape", "mad", "rnd")
    assert select(hand, "cas", 0.25) == cas(hand, ratio=0.25)
    assert select(hand, "lape", 0.5, filter_rate=0.75, bar_ratio=0.5) == lape(
        hand, top_rate=0.5, filter_rate=0.75, bar_ratio=0.5
    )
    m = select(hand, "lap")
    assert m.options["ratio"] == 0.005 and m.method == "lap"
    with pytest.raises(UsageError, match="unknown selector 'topk'"):
        select(hand, "topk")
    with pytest.raises(UsageError, match="takes no option contrast"):
        select(hand, "lap", contrast="max")
    with pytest.raises(UsageError, match="either ratio or top_rate"):
        select(hand, "lape", 0.1, top_rate=0.2)
    with pytest.raises(UsageError, match=r"share in \[0, 1\]"):
        select(hand, "cas", 5)


def test_culture_without_tokens_is_named():
    st = make_stats(HAND_K, [16, 0, 16])
    for method in ("cas", "lap", "lape", "mad"):
        with pytest.raises(DataError, match="'c1'"):
            select(st, method)


def test_contrast_selectors_need_two_cultures():
    st = make_stats(HAND_K[:1], [16])
    with pytest.raises(UsageError, match="at least 2"):
        cas(st)
    assert lap(st, ratio=0.25).sizes().tolist() == [2]
