"""The functional API against plain-PyTorch references written here, row by row, and against
the Instrument on a tiny model; into a Totals (on the device) and, for compatibility, a Stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from conftest import short_batch
from stats_reference import act

import culture_neurons as cn
from culture_neurons.errors import StatsMismatchError, UnsupportedModelError, UsageError
from culture_neurons.instrument import Totals
from culture_neurons.instrument import functional as F
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.stats import Fingerprint, Stats
from culture_neurons.testing.tiny import tiny_model

CULTURES = ["ja", "mx", "ng", "br"]


def fingerprint(L: int, N: int, act_fn: str = "silu") -> Fingerprint:
    return Fingerprint("llama", "llama", L, N, 8, act_fn, "test")


def random_stats(L: int, N: int, activation: str = "gate", act_fn: str = "silu") -> Stats:
    """Stats that do not start at zero, so that ``+=`` (not ``=``) is what gets tested."""
    st = Stats.zeros(CULTURES, fingerprint(L, N, act_fn), activation)
    gen = torch.Generator().manual_seed(1)
    st.K += torch.randint(0, 50, st.K.shape, generator=gen)
    st.S += torch.randn(st.S.shape, generator=gen, dtype=torch.float64)
    st.Q += torch.rand(st.Q.shape, generator=gen, dtype=torch.float64)
    st.T += 7
    return st


@pytest.fixture(params=["totals", "stats"])
def into(request):
    """``into(stats) -> (target, result)``: what the functional calls add into (a Totals
    continuing from ``stats``, or ``stats`` itself) and how to read it back as Stats."""

    def make(st: Stats):
        if request.param == "stats":
            return st, lambda: st
        totals = Totals.like(st)
        totals.start_from(st)
        return totals, totals.stats

    return make


def random_rows(lead: tuple[int, ...], C: int = len(CULTURES), seed: int = 0):
    """Culture ids in [-1, C) and 0/1 weights ``lead``, both with some of every value."""
    gen = torch.Generator().manual_seed(seed)
    culture = torch.randint(-1, C, lead, generator=gen)
    weights = (torch.rand(lead, generator=gen) > 0.2).long()
    return culture, weights


def reference(a: torch.Tensor, culture: torch.Tensor, weights: torch.Tensor | None, C: int):
    """K [C, N] int64, S, Q [C, N] fp64 with a Python loop over rows (the SPEC's sums)."""
    N = a.shape[-1]
    rows, ids = a.reshape(-1, N).double(), culture.reshape(-1)
    w = torch.ones_like(ids) if weights is None else weights.reshape(-1)
    K = torch.zeros(C, N, dtype=torch.int64)
    S = torch.zeros(C, N, dtype=torch.float64)
    Q = torch.zeros(C, N, dtype=torch.float64)
    for r in range(rows.shape[0]):
        c = int(ids[r])
        if c < 0 or int(w[r]) == 0:
            continue
        K[c] += (rows[r] > 0).long()
        S[c] += rows[r]
        Q[c] += rows[r] ** 2
    return K, S, Q


def check_layer(before: Stats, after: Stats, layer: int, want, rtol: float) -> None:
    """Only ``layer`` moved, by ``want`` = (K, S, Q): counts exactly, sums to rtol."""
    K, S, Q = want
    bad = ((after.K[:, layer] - before.K[:, layer]) != K).nonzero()
    assert len(bad) == 0, f"K differs first at (culture, neuron) {bad[0].tolist()}"
    for name, ref in (("S", S), ("Q", Q)):
        got = getattr(after, name)[:, layer] - getattr(before, name)[:, layer]
        atol = rtol * float(ref.abs().max()) + 1e-9  # sums that cancel to ~0
        close = torch.isclose(got, ref, rtol=rtol, atol=atol)
        assert bool(close.all()), f"{name} differs first at {(~close).nonzero()[0].tolist()}"
    others = [i for i in range(after.K.shape[1]) if i != layer]
    assert torch.equal(after.K[:, others], before.K[:, others]), "other layers must not move"
    assert torch.equal(after.T, before.T), "accumulate must not count tokens"


# --- accumulate --------------------------------------------------------------------------------


@pytest.mark.parametrize("lead,N", [((1,), 1), ((7,), 33), ((130,), 67), ((3, 11), 20)])
def test_accumulate_matches_reference(lead, N, into):
    st = random_stats(L=3, N=N)
    before = st.clone()
    target, result = into(st)
    a = torch.randn(*lead, N) * 2  # never zeros: both signs, so K is tested
    culture, weights = random_rows(lead)
    F.accumulate(target, 1, a, culture, weights)
    # fp32 sums within a row chunk (<= 130 terms: <= 130 * 2^-24 relative to sum|a|), then fp64.
    check_layer(before, result(), 1, reference(a, culture, weights, len(CULTURES)), rtol=1e-5)


def test_accumulate_per_item_ids_and_no_weights(into):
    """culture [B] for a [B, T, N] tensor means every token of item b; weights default to 1."""
    st = random_stats(L=2, N=9)
    before = st.clone()
    target, result = into(st)
    a = torch.randn(3, 5, 9).to(torch.bfloat16)  # any float dtype: bf16 values are exact in fp64
    item = torch.tensor([2, -1, 0])
    F.accumulate(target, 0, a, item)
    per_row = item.view(3, 1).expand(3, 5)
    check_layer(before, result(), 0, reference(a, per_row, None, len(CULTURES)), rtol=1e-5)


def test_count_tokens_once_per_forward(into):
    target, result = into(Stats.zeros(CULTURES, fingerprint(2, 4)))
    item = torch.tensor([1, 3, 1, -1])
    weights = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    F.count_tokens(target, item, weights)
    F.count_items(target, item)
    assert result().T.tolist() == [0, 2 + 3, 0, 2]
    assert result().items.tolist() == [0, 2, 0, 1]
    F.count_tokens(target, torch.tensor([[0, -1], [2, 2]]))  # per-row ids, no weights
    assert result().T.tolist() == [1, 5, 2, 2]


def test_totals_and_stats_give_identical_numbers():
    """The compatibility path (a Stats) and the device path (a Totals) add the same fp32 chunk
    sums into fp64 in the same order: bit-equal, over several calls and layers."""
    st = random_stats(L=3, N=21)
    totals = Totals.like(st)
    totals.start_from(st)
    gen = torch.Generator().manual_seed(5)
    for call in range(4):
        lead = (2, 9 + call)
        a, gate, up = (torch.randn(*lead, 21, generator=gen) for _ in range(3))
        culture, weights = random_rows(lead, seed=call)
        for target in (st, totals):
            F.count_tokens(target, culture, weights)
            F.accumulate(target, call % 3, a, culture, weights)
            F.accumulate_mlp(target, (call + 1) % 3, gate, up, culture, weights)
    got = totals.stats()
    for name in ("T", "K", "S", "Q", "items"):
        assert torch.equal(getattr(got, name), getattr(st, name)), name


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda st, a: F.accumulate(st, 2, a, 0), UsageError),  # layer out of range
        (lambda st, a: F.accumulate(st, 0, a[..., :3], 0), StatsMismatchError),  # wrong N
        (lambda st, a: F.accumulate(st, 0, a, torch.zeros(5, dtype=torch.long)), UsageError),
        (lambda st, a: F.accumulate(st, 0, a, 4), UsageError),  # culture id >= C
        (lambda st, a: F.accumulate(st, 0, a, 0, torch.full((2, 3), 2)), UsageError),  # w = 2
        (lambda st, a: F.accumulate(st, 0, a, torch.zeros(2)), UsageError),  # float ids
    ],
)
def test_accumulate_refuses_bad_input(call, error):
    st = Stats.zeros(CULTURES, fingerprint(2, 4))
    with pytest.raises(error):
        call(st, torch.randn(2, 3, 4))


# --- accumulate_mlp (the fused op) -------------------------------------------------------------


@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("activation", ["gate", "post"])
@pytest.mark.parametrize("lead,N", [((1,), 1), ((7,), 33), ((4, 29), 67)])
def test_accumulate_mlp_matches_reference(act_fn, activation, lead, N, into):
    st = random_stats(L=2, N=N, activation=activation, act_fn=act_fn)
    before = st.clone()
    target, result = into(st)
    gen = torch.Generator().manual_seed(3)
    # Clamped below: fp32 GELU-tanh rounds to 0 below g ~ -5 where fp64 keeps a tiny value
    # whose sign (that of -up in "post") would make K differ by rounding (see conftest).
    gate = (torch.randn(*lead, N, generator=gen) * 2).clamp(min=-4.5)
    up = torch.randn(*lead, N, generator=gen)
    culture, weights = random_rows(lead, seed=4)
    h = F.accumulate_mlp(target, 1, gate, up, culture, weights)
    eager = tF.silu(gate) if act_fn == "silu" else tF.gelu(gate, approximate="tanh")
    assert torch.equal(h, eager * up), "h must be exactly the eager act(gate) * up"
    a = act(gate.double(), act_fn)
    a = a if activation == "gate" else a * up.double()
    # fp32 sums within the call (as the fused backend) vs fp64: 1e-5 relative (conftest).
    check_layer(before, result(), 1, reference(a, culture, weights, len(CULTURES)), rtol=1e-5)


def test_accumulate_mlp_refuses_contradicting_mode():
    st = Stats.zeros(CULTURES, fingerprint(2, 4), activation="gate")
    g = torch.randn(3, 4)
    with pytest.raises(StatsMismatchError, match="activation"):
        F.accumulate_mlp(st, 0, g, g, 0, activation="post")
    with pytest.raises(StatsMismatchError, match="act_fn"):
        F.accumulate_mlp(st, 0, g, g, 0, act_fn="gelu_tanh")
    with pytest.raises(UsageError, match="culture"):
        F.accumulate_mlp(st, 0, g, g)


# --- ablation ----------------------------------------------------------------------------------


def hand_masks(L: int = 3, N: int = 12) -> Masks:
    """Three sets over L x N: several neurons in a layer, an empty layer, an empty set."""
    sets = [[0 * N + 1, 0 * N + 5, 2 * N + 11], [1 * N + 0, 1 * N + 5, 1 * N + 6], []]
    return Masks.from_sets(["ja", "mx", "ng"], [torch.tensor(s) for s in sets], fingerprint(L, N))


def ablate_reference(h: torch.Tensor, masks: Masks, layer: int, set_ids: torch.Tensor):
    out = h.clone().reshape(-1, h.shape[-1])
    for r, s in enumerate(set_ids.reshape(-1).tolist()):
        if s < 0:
            continue
        for lay, n in masks.pairs(s).tolist():
            if lay == layer:
                out[r, n] = 0
    return out.view(h.shape)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_ablate_per_row(layer):
    masks = hand_masks()
    h = torch.randn(5, 7, 12) + 0.1  # never exactly zero before ablation
    set_ids = torch.randint(-1, 3, (5, 7), generator=torch.Generator().manual_seed(layer))
    want = ablate_reference(h, masks, layer, set_ids)
    got = F.ablate(h, masks, layer, set_ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, h), "every layer has neurons of some set: something is zeroed"
    inplace = h.clone()
    assert F.ablate_(inplace, masks, layer, set_ids) is inplace
    assert torch.equal(inplace, want)


def test_ablate_per_item_and_int_ids():
    masks = hand_masks()
    h = torch.randn(2, 4, 12) + 0.1
    got = F.ablate(h, masks, 0, torch.tensor([0, -1]))  # [B] per item
    assert torch.equal(got, ablate_reference(h, masks, 0, torch.tensor([[0] * 4, [-1] * 4])))
    assert (got[0, :, [1, 5]] == 0).all() and torch.equal(got[1], h[1])
    assert torch.equal(F.ablate(h, masks, 0, -1), h)
    assert torch.equal(
        F.ablate(h, masks, 1, 1), ablate_reference(h, masks, 1, torch.ones(8, dtype=torch.long))
    )
    with pytest.raises(UsageError, match="set ids"):
        F.ablate(h, masks, 0, 3)


def test_accumulate_mlp_ablates_and_records_ablated_values():
    masks = hand_masks()
    st = Stats.zeros(CULTURES, masks.fingerprint)
    gate, up = torch.randn(2, 6, 12) * 2, torch.randn(2, 6, 12)
    set_ids = torch.tensor([1, -1])
    h = F.accumulate_mlp(st, 1, gate, up, torch.tensor([0, 1]), masks=masks, set_ids=set_ids)
    a = F.ablate(tF.silu(gate), masks, 1, set_ids)
    assert torch.equal(h, a * up)
    K, _, _ = reference(a, torch.tensor([[0] * 6, [1] * 6]), None, len(CULTURES))
    assert torch.equal(st.K[:, 1], K)
    assert (st.K[0, 1, [0, 5, 6]] == 0).all()  # ablated neurons never fire


# --- equivalence with the Instrument on a tiny model -------------------------------------------


def test_mlp_forward_equals_instrument_on_tiny_llama():
    """A forward hook that replaces each MLP's output by ``mlp_forward`` (what another library's
    forward code would call) gives the Instrument's statistics and logits."""
    model = tiny_model("llama")
    inputs = short_batch()
    fp = adapters.fingerprint(model)
    masks = Masks.from_sets(["ja", "mx"], [torch.tensor([3, 96 + 7, 2 * 96 + 50]),
                                           torch.tensor([96 + 8])], fp)  # fmt: skip
    item, sets = [0, 2, 0], [0, -1, 1]
    with cn.Instrument(model, CULTURES, masks) as inst, torch.no_grad():
        want_logits = inst(item, set_ids=sets, **inputs).logits
        want = inst.stats()

    totals = Totals(CULTURES, fp)
    w = inputs["attention_mask"]
    F.count_tokens(totals, torch.tensor(item), w)
    F.count_items(totals, torch.tensor(item))

    def hook(layer):
        def replace(mlp, args, out):
            return F.mlp_forward(mlp, args[0], layer=layer, totals=totals,
                                 culture=torch.tensor(item), weights=w, masks=masks,
                                 set_ids=torch.tensor(sets))  # fmt: skip

        return replace

    mlps = adapters.decoder_mlps(model)
    handles = [mlp.register_forward_hook(hook(i)) for i, mlp in enumerate(mlps)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    st = totals.stats()
    assert torch.equal(logits, want_logits)
    assert torch.equal(st.T, want.T) and torch.equal(st.items, want.items)
    assert torch.equal(st.K, want.K), f"K differs at {(st.K != want.K).nonzero()[0].tolist()}"
    # Same fused op adding into int64 / fp64 [C, N] totals in the same order: equal bit for bit.
    assert torch.equal(st.S, want.S) and torch.equal(st.Q, want.Q)


def test_keep_masks_are_built_once_and_freed_with_their_masks(monkeypatch):
    masks = hand_masks()
    built = []
    real = Masks.keep_mask
    monkeypatch.setattr(Masks, "keep_mask", lambda self, *a, **k: built.append(k) or real(self, *a, **k))
    h = torch.randn(4, 12)
    for _ in range(3):  # three forwards
        for layer in range(3):
            F.ablate_(h.clone(), masks, layer, 0)
            F.accumulate_mlp(None, layer, h, h, masks=masks, set_ids=1)
    assert len(built) == 3, "one keep mask per (masks, layer, device), never one per call"
    assert F.keep_mask(masks, 1, "cpu", torch.uint8) is F.keep_mask(masks, 1, "cpu", torch.uint8)
    del masks
    import gc

    gc.collect()
    assert not F._KEEP._by_masks, "the cache must not keep dead masks (or their tensors) alive"


class GemmaLikeMLP(torch.nn.Module):
    """The HF gated MLP shape with transformers' GELU-tanh module (Gemma3's act_fn)."""

    def __init__(self, hidden: int = 8, N: int = 12):
        super().__init__()
        from transformers.activations import GELUTanh

        torch.manual_seed(0)
        self.gate_proj = torch.nn.Linear(hidden, N, bias=False)
        self.up_proj = torch.nn.Linear(hidden, N, bias=False)
        self.down_proj = torch.nn.Linear(N, hidden, bias=False)
        self.act_fn = GELUTanh()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_mlp_forward_without_stats_is_the_module_and_finds_its_activation():
    mlp = GemmaLikeMLP()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(F.mlp_forward(mlp, x, layer=0), mlp(x))
        masks = hand_masks()  # N = 12: layer 0 of set 0 holds neurons 1 and 5
        out = F.mlp_forward(mlp, x, layer=0, masks=masks, set_ids=0)
        h = tF.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x)
        h[..., [1, 5]] = 0
        assert torch.equal(out, mlp.down_proj(h))
    mlp.act_fn = torch.nn.ReLU()  # its sign is not gate_proj's: refused, naming act_fn
    with pytest.raises(UnsupportedModelError, match="act_fn is ReLU"):
        F.mlp_forward(mlp, x, layer=0)
