"""The fused backend against the hooks reference, and ablation against an edited-weights model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import short_batch
from stats_reference import assert_stats_equal, capture_mlp_inputs

import culture_neurons as cn
from culture_neurons.kernels import dispatch
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.testing.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_processor

CULTURES = ["ja", "mx", "ng"]


def batch_of(family: str, padding_side: str = "left", seed: int = 0) -> dict:
    return dict(tiny_batch(family, tiny_processor(family), n=3, seed=seed, padding_side=padding_side))


def run(model, inputs, backend, culture=(0, 2, 0), masks=None, set_ids=None, **kw):
    """(stats or None, logits) of one instrumented forward."""
    inst = cn.Instrument(model, CULTURES if culture is not None else None, masks,
                         backend=backend, **kw)  # fmt: skip
    with inst, torch.no_grad():
        logits = inst(list(culture) if culture is not None else None, set_ids=set_ids, **inputs).logits
        return (inst.stats() if culture is not None else None), logits


def as_ref(stats) -> dict:
    return {n: getattr(stats, n) for n in "TKSQ"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_equals_hooks_and_leaves_outputs_alone(family):
    model = tiny_model(family)
    inputs = batch_of(family)
    _, plain = capture_mlp_inputs(model, inputs)
    hooks, hooks_logits = run(model, inputs, "hooks")
    fused, fused_logits = run(model, inputs, "fused")
    # fp32 working sums in the fused op vs fp64 in hooks: same values, rounding only.
    assert_stats_equal(fused, as_ref(hooks), rtol=1e-5)
    assert torch.equal(fused.items, hooks.items)
    # The fused op computes act(g) * u with the same fp32 torch ops as the eager MLP.
    assert torch.equal(fused_logits, plain) and torch.equal(hooks_logits, plain)


@pytest.mark.parametrize("scope", ["text", "image", "last"])
@pytest.mark.parametrize("activation", ["gate", "post"])
def test_fused_equals_hooks_every_scope(scope, activation):
    model = tiny_model("qwen2_vl")
    inputs = batch_of("qwen2_vl", padding_side="right")
    args = dict(culture=(2, -1, 1), scope=scope, activation=activation)
    hooks, _ = run(model, inputs, "hooks", **args)
    fused, _ = run(model, inputs, "fused", **args)
    assert_stats_equal(fused, as_ref(hooks), rtol=1e-5)


def random_masks(model, sizes=(5, 9), seed=0) -> Masks:
    fp = adapters.fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    total = fp.num_layers * fp.num_neurons
    sets = [torch.randperm(total, generator=g)[:k] for k in sizes]
    return Masks.from_sets(["ja", "mx"], sets, fp, method="test")


def ablated_by_weights(model, masks: Masks, s: int) -> torch.nn.Module:
    """A copy whose down_proj columns of set s are zero: the neurons' contribution vanishes.
    Written apart from the package's masking, as the independent reference of ablation."""
    edited = copy.deepcopy(model)
    mlps = adapters.decoder_mlps(edited)
    for layer, neuron in masks.pairs(s).tolist():
        with torch.no_grad():
            mlps[layer].down_proj.weight[:, neuron] = 0
    return edited


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "mistral"])
def test_ablation_per_row_matches_edited_weights(family):
    model = tiny_model(family)
    inputs = batch_of(family)
    masks = random_masks(model)
    row_sets = [0, -1, 1]
    _, hooks = run(model, inputs, "hooks", culture=None, masks=masks, set_ids=row_sets)
    _, fused = run(model, inputs, "fused", culture=None, masks=masks, set_ids=row_sets)
    for b, s in enumerate(row_sets):
        reference = model if s < 0 else ablated_by_weights(model, masks, s)
        _, want = capture_mlp_inputs(reference, inputs)
        # Zeroing a (ours) vs zeroing W columns (reference) sums the same terms in another
        # order: fp32 rounding only.
        torch.testing.assert_close(hooks[b], want[b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused[b], want[b], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused[0], capture_mlp_inputs(model, inputs)[1][0])


def test_recording_under_ablation_sees_zeroed_neurons():
    model = tiny_model("llava")
    inputs = batch_of("llava")
    masks = random_masks(model, sizes=(40, 3))
    args = dict(culture=(0, 1, 2), masks=masks, set_ids=[0, 0, -1])
    hooks, _ = run(model, inputs, "hooks", **args)
    fused, _ = run(model, inputs, "fused", **args)
    assert_stats_equal(fused, as_ref(hooks), rtol=1e-5)
    dense = masks.dense()[0]  # [L, N], set 0 was ablated for cultures 0 and 1
    assert (fused.K[0][dense] == 0).all() and (fused.S[1][dense] == 0).all()


def test_hooks_on_sub_modules_keep_firing():
    model = tiny_model("llama")
    inputs = batch_of("llama")
    mlp = adapters.decoder_mlps(model)[1]
    seen = []
    h1 = mlp.act_fn.register_forward_hook(lambda m, a, out: seen.append("act_fn"))
    h2 = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append("down_proj"))
    hooks, _ = run(model, inputs, "hooks")
    seen.clear()
    with pytest.warns(UserWarning, match="act_fn"):
        fused, _ = run(model, inputs, "fused")
    assert seen == ["act_fn", "down_proj"]
    assert_stats_equal(fused, as_ref(hooks), rtol=1e-5)
    h1.remove()
    h2.remove()


def test_fused_detach_restores_forward_and_repr():
    model = tiny_model("qwen2")
    mlps = adapters.decoder_mlps(model)
    before = repr(model)
    with cn.record(model, CULTURES, backend="fused") as rec:
        assert rec.backend == "fused" and "culture_neurons: fused" in repr(model)
        assert all("forward" in m.__dict__ for m in mlps)
    assert all("forward" not in m.__dict__ for m in mlps) and repr(model) == before


def test_masks_of_another_model_are_refused():
    from culture_neurons.errors import StatsMismatchError

    masks = random_masks(tiny_model("llama"))
    with pytest.raises(StatsMismatchError, match="another model"):
        cn.ablate(tiny_model("mistral"), masks)


@pytest.fixture
def forced_kernel(monkeypatch):
    """The Triton kernel forced on every device (the interpreter on this CPU), decisions fresh
    before and forgotten after, whatever the test does."""
    pytest.importorskip("triton")
    monkeypatch.setenv(dispatch.MODE_ENV, "triton")
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.mark.parametrize("culture", [(0, 2, 0), (1, 1, -1)])
def test_fused_through_the_triton_kernel_equals_hooks(culture, forced_kernel):
    """The fused backend on the Triton kernel (forced; the interpreter here) records what hooks
    record, under per-row ablation: batches of several cultures, and of one (whose id the
    batch passes to the kernel, which then skips its search)."""
    model = tiny_model("llama")
    inputs = short_batch()
    masks = random_masks(model, sizes=(5, 9))
    args = dict(culture=culture, masks=masks, set_ids=[0, -1, 1])
    hooks, hooks_logits = run(model, inputs, "hooks", **args)
    fused, fused_logits = run(model, inputs, "fused", **args)
    assert dispatch.status()["checked"], "the kernel path did not run"
    assert_stats_equal(fused, as_ref(hooks), rtol=1e-5)
    # The kernel's exp and fp32 products round a few ulp from torch's: logits agree closely.
    torch.testing.assert_close(fused_logits, hooks_logits, rtol=1e-4, atol=1e-5)


def test_reset_stats_keeps_the_bound_totals():
    """reset_stats zeroes in place: the fused backend's per-layer ops (bound at attach) keep
    adding into the totals that stats() reads."""
    model = tiny_model("llama")
    inputs = short_batch()
    with cn.record(model, CULTURES, backend="fused") as rec, torch.no_grad():
        rec([0, 1, 2], **inputs)
        rec.reset_stats()
        rec([0, 1, 2], **inputs)
        twice_reset = rec.stats()
    once, _ = run(model, inputs, "fused", culture=(0, 1, 2))
    assert_stats_equal(twice_reset, as_ref(once), rtol=0)
