"""Exports (TransformerLens, pyvene, LAPE) on hand-made masks, and nnsight recording/ablation
against the Instrument on a tiny Llama."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import short_batch

import culture_neurons as cn
from culture_neurons import interop
from culture_neurons.errors import UsageError
from culture_neurons.instrument import Totals
from culture_neurons.instrument import functional as F
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.stats import Fingerprint, Stats
from culture_neurons.testing.tiny import tiny_model

CULTURES = ["ja", "mx", "ng"]
FP = Fingerprint("llama", "llama", 4, 10, 8, "silu", "test")  # L = 4, N = 10


def hand_masks() -> Masks:
    """ja: layers 0 and 3 (layers 1, 2 empty); mx: layer 2 only; ng: empty."""
    sets = [[0 * 10 + 2, 0 * 10 + 7, 3 * 10 + 0, 3 * 10 + 9], [2 * 10 + 4], []]
    return Masks.from_sets(CULTURES, [torch.tensor(s) for s in sets], FP, method="cas")


# --- TransformerLens ---------------------------------------------------------------------------


def test_transformer_lens_export_names_layers_and_indices():
    masks = hand_masks()
    assert interop.to_transformer_lens(masks, "ja") == [
        ("blocks.0.mlp.hook_post", [2, 7]),
        ("blocks.3.mlp.hook_post", [0, 9]),
    ]
    assert interop.to_transformer_lens(masks, 1) == [("blocks.2.mlp.hook_post", [4])]
    assert interop.to_transformer_lens(masks, "ng") == []
    with pytest.raises(UsageError, match="unknown set"):
        interop.to_transformer_lens(masks, "xx")


def test_transformer_lens_hooks_zero_exactly_those_indices():
    masks = hand_masks()
    hooks = dict(interop.transformer_lens_hooks(masks, "ja"))
    assert set(hooks) == {"blocks.0.mlp.hook_post", "blocks.3.mlp.hook_post"}
    post = torch.randn(2, 5, 10) + 0.1  # [batch, pos, d_mlp], no exact zeros
    original = post.clone()
    out = hooks["blocks.3.mlp.hook_post"](post, None)
    zeroed = torch.zeros(10, dtype=torch.bool)
    zeroed[[0, 9]] = True
    assert (out[..., zeroed] == 0).all()
    assert torch.equal(out[..., ~zeroed], original[..., ~zeroed])


@pytest.mark.parametrize("activation", ["gate", "post"])
def test_transformer_lens_record_hooks_equal_accumulate(activation):
    """Hooks fed TL-shaped tensors add what functional.accumulate adds for a = act(pre) / post."""
    item, weights = torch.tensor([2, -1, 0]), torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    totals = Totals(CULTURES, FP, activation=activation)
    want = Stats.zeros(CULTURES, FP, activation=activation)
    hooks = interop.transformer_lens_record_hooks(totals, item, weights)
    kind = "hook_pre" if activation == "gate" else "hook_post"
    assert [name for name, _ in hooks] == [f"blocks.{l}.mlp.{kind}" for l in range(4)]
    gen = torch.Generator().manual_seed(0)
    for layer, (_, hook) in enumerate(hooks):
        value = torch.randn(3, 3, 10, generator=gen)  # [batch, pos, d_mlp]
        hook(value, None)
        a = torch.nn.functional.silu(value) if activation == "gate" else value
        F.accumulate(want, layer, a, item, weights)
    got = totals.stats()
    assert torch.equal(got.K, want.K) and torch.equal(got.S, want.S)
    assert int(got.K.sum()) > 0 and torch.equal(got.T, want.T)


# --- pyvene ------------------------------------------------------------------------------------


def test_pyvene_export_round_trips_through_json():
    masks = hand_masks()
    config = interop.to_pyvene(masks, "ja")
    again = json.loads(json.dumps(config))
    assert again == config
    reps = again["representations"]
    assert [r["layer"] for r in reps] == [0, 3]
    assert {r["component"] for r in reps} == {"mlp_activation"}
    assert {r["intervention_type"] for r in reps} == {"ZeroIntervention"}
    assert {r["unit"] for r in reps} == {"pos"}
    assert again["subspaces"] == [[2, 7], [0, 9]]
    assert again["set"] == "ja" and again["model"]["num_neurons"] == 10
    assert interop.to_pyvene(masks, "ng")["representations"] == []


@pytest.mark.skipif(importlib.util.find_spec("pyvene") is not None, reason="pyvene is installed")
def test_pyvene_config_says_how_to_install_pyvene():
    with pytest.raises(UsageError, match="pip install pyvene"):
        interop.pyvene_config(interop.to_pyvene(hand_masks(), "ja"))


# --- LAPE --------------------------------------------------------------------------------------


def test_lape_reexport_round_trips(tmp_path):
    masks = hand_masks()
    path = interop.to_lape(masks, tmp_path / "lape.pt")
    back = interop.from_lape(path, FP, CULTURES, method="cas")
    assert torch.equal(back.flat, masks.flat) and torch.equal(back.indptr, masks.indptr)


# --- nnsight -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    inputs = short_batch()
    fp = adapters.fingerprint(model)
    masks = Masks.from_sets(["ja", "mx"], [torch.tensor([3, 96 + 7, 2 * 96 + 50]),
                                           torch.tensor([96 + 8, 2 * 96])], fp)  # fmt: skip
    return model, inputs, masks


ITEM, SETS = [0, 2, -1], [0, -1, 1]  # every culture id kind and set id kind, once each


@pytest.fixture(scope="module")
def reference(llama):
    """``{activation: (stats, logits)}`` of the Instrument (fused) without nnsight, on ITEM/SETS."""
    model, inputs, masks = llama
    out = {}
    for activation in ("gate", "post"):
        inst = cn.Instrument(model, CULTURES, masks, activation=activation)
        with inst, torch.no_grad():
            logits = inst(ITEM, set_ids=SETS, **inputs).logits
            out[activation] = inst.stats(), logits
    return out


def assert_same_stats(got: Stats, want: Stats) -> None:
    assert torch.equal(got.T, want.T) and torch.equal(got.items, want.items)
    bad = (got.K != want.K).nonzero()
    assert len(bad) == 0, f"K differs first at (culture, layer, neuron) {bad[0].tolist()}"
    # fp64 sums here vs fp32 partial sums in the fused op: rounding of the fp32 sums only.
    for name in ("S", "Q"):
        g, w = getattr(got, name), getattr(want, name)
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max())), name


def test_mlp_paths_find_the_decoder_mlps(llama):
    model, _, _ = llama
    assert interop.mlp_paths(model) == [f"model.layers.{i}.mlp" for i in range(3)]


@pytest.mark.parametrize("kind", ["totals", "stats"])
@pytest.mark.parametrize("activation", ["gate", "post"])
def test_record_in_nnsight_trace_equals_instrument(llama, reference, activation, kind):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed (pip install nnsight)")
    model, inputs, masks = llama
    item, sets = ITEM, SETS
    want, want_logits = reference[activation]

    lm = nnsight.NNsight(model)
    make = Totals if kind == "totals" else Stats.zeros
    target = make(CULTURES, adapters.fingerprint(model), activation=activation)
    with torch.no_grad(), lm.trace(**inputs):
        interop.record_in_trace(lm, target, torch.tensor(item), inputs["attention_mask"],
                                masks=masks, set_ids=torch.tensor(sets))  # fmt: skip
        logits = lm.output.logits.save()
    assert torch.equal(logits, want_logits)
    assert_same_stats(target.stats() if kind == "totals" else target, want)


def test_instrument_under_nnsight_trace_equals_plain(llama, reference):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed (pip install nnsight)")
    model, inputs, masks = llama
    item, sets = ITEM, SETS
    want, want_logits = reference["gate"]

    lm = nnsight.NNsight(model)  # wrap first, then attach (see interop.instrument)
    with interop.instrument(lm, CULTURES, masks) as inst, torch.no_grad():
        inst.set_batch(item, set_ids=sets, **inputs)
        with lm.trace(**inputs):
            hidden = lm.model.layers[1].output.save()  # nnsight's access keeps working
            logits = lm.output.logits.save()
        got = inst.stats()
    assert torch.equal(logits, want_logits)
    assert torch.equal(got.K, want.K) and torch.equal(got.S, want.S)
    assert hidden.shape[-1] == 64
    with torch.no_grad(), lm.trace(**inputs):  # after detach, the MLP's output is back
        mlp_out = lm.model.layers[0].mlp.output.save()
    assert mlp_out.shape == (3, inputs["input_ids"].shape[1], 64)


def test_record_in_trace_refuses_nothing_to_do(llama):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed (pip install nnsight)")
    model, inputs, masks = llama
    lm = nnsight.NNsight(model)
    with pytest.raises(UsageError, match="give totals"):
        interop.record_in_trace(lm)
    with pytest.raises(UsageError, match="together"):
        interop.record_in_trace(lm, masks=masks)
    totals = Totals(CULTURES, adapters.fingerprint(model))
    with cn.Instrument(model, CULTURES, backend="fused"):
        with pytest.raises(UsageError, match="fused backend"):
            interop.record_in_trace(lm, totals, 0)
