"""attribution.py: per-item, per-neuron sum_t a * dq/da against a finite difference of steering
and against a plain per-token computation."""

from __future__ import annotations

import pytest
import torch

import culture_neurons as cn
from culture_neurons.errors import UsageError
from culture_neurons.instrument.attribution import attribute
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.testing.tiny import tiny_model

TOKEN = 7  # the quantity: each item's logit of this token at its last real position, and a margin


@pytest.fixture(scope="module")
def batch():
    """3 right-padded prompts of different lengths. Right padding: HF's fp64 eager attention
    gives NaN logits on left-padded rows (fully masked query rows), and a causal LM keeps its
    positions under right padding."""
    from culture_neurons.testing.tiny import tiny_processor

    tok = tiny_processor("llama")
    texts = ["What is shown?", "Which traditional dish is shown in this picture? A. rice",
             "the festival"]  # fmt: skip
    return dict(tok(texts, return_tensors="pt", padding=True))


def quantities_of(batch):
    last = batch["attention_mask"].sum(dim=1) - 1  # each row's last real position

    def quantities(out) -> torch.Tensor:
        logits = out.logits[torch.arange(len(last)), last]  # [B, V]
        return torch.stack([logits[:, TOKEN], logits[:, TOKEN + 1] - logits[:, TOKEN]], dim=1)

    return quantities


@pytest.fixture(scope="module")
def llama64():
    """fp64 so that a finite difference is exact to ~1e-9, not fp32 noise."""
    return tiny_model("llama").double()


def test_sums_equal_a_plain_per_token_computation(llama64, batch):
    quantities = quantities_of(batch)
    q, A = attribute(llama64, batch, quantities)
    mlps = adapters.decoder_mlps(llama64)
    fp = adapters.fingerprint(llama64)
    assert A.shape == (2, 3, fp.num_layers, fp.num_neurons)
    for k in range(2):
        # Reference: keep every act output with retain_grad, one backward, sum with loops.
        kept = []

        def keep(module, args, a, kept=kept):
            a.retain_grad()
            kept.append(a)

        handles = [m.act_fn.register_forward_hook(keep) for m in mlps]
        embeds = llama64.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        try:
            out = llama64(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
            quantities(out)[:, k].sum().backward()
        finally:
            for h in handles:
                h.remove()
        mask = batch["attention_mask"]
        for layer, a in enumerate(kept):
            for b in range(3):
                want = torch.zeros(fp.num_neurons, dtype=torch.float64)
                for t in range(a.shape[1]):
                    if mask[b, t]:
                        want += a[b, t].detach() * a.grad[b, t]
                torch.testing.assert_close(A[k, b, layer].double(), want, rtol=1e-5, atol=1e-6)
        llama64.zero_grad(set_to_none=True)
    torch.testing.assert_close(q, quantities(llama64(**batch)).detach().float())


def test_single_neuron_matches_a_finite_difference_of_steering(llama64, batch):
    """d q / d alpha at alpha = 0 for scaling neuron (l, n) by 1 + alpha is A[., ., l, n]."""
    quantities = quantities_of(batch)
    _, A = attribute(llama64, batch, quantities)
    fp = adapters.fingerprint(llama64)
    gen = torch.Generator().manual_seed(0)
    # Central difference: error ~eps^2 (measured 2e-5 relative at eps 1e-2); smaller eps meets
    # the model's own rounding (some of HF's llama math, e.g. rotary, stays fp32 in a .double()
    # model: ~1e-8 on the logits, 5e-6 on a difference quotient at eps 1e-3).
    eps = 1e-2
    for _ in range(4):
        layer = int(torch.randint(0, fp.num_layers, (1,), generator=gen))
        # The neuron with the largest |A| of that layer for item 0, so the check is not vacuous.
        neuron = int(A[0, 0, layer].abs().argmax())
        masks = Masks.from_sets(["one"], [torch.tensor([layer * fp.num_neurons + neuron])], fp)
        scores = []
        for alpha in (eps, -eps):
            with cn.steer(llama64, masks, alpha, backend="hooks") as st, torch.no_grad():
                scores.append(quantities(st(set_ids=0, **batch)))
        fd = (scores[0] - scores[1]) / (2 * eps)  # [B, Q]
        torch.testing.assert_close(A[:, :, layer, neuron].T.double(), fd, rtol=1e-3, atol=1e-6)
        assert float(A[:, :, layer, neuron].abs().max()) > 1e-4


def test_rows_are_attributed_independently(llama64, batch):
    """Item b's A does not depend on the other rows of its batch."""
    quantities = quantities_of(batch)
    _, A = attribute(llama64, batch, quantities)
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        alone = {k: v[b : b + 1, :n] for k, v in batch.items()}
        _, A1 = attribute(llama64, alone, quantities_of(alone))
        torch.testing.assert_close(A1[:, 0], A[:, b], rtol=1e-6, atol=1e-9)


def test_weights_leave_padding_out_and_weights_are_restored(llama64, batch):
    llama64.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in llama64.parameters()]
    w = batch["attention_mask"].clone()
    w[1, -1] = 0  # drop row 1's last position: it contributes to A, so A must change
    quantities = quantities_of(batch)
    _, A_all = attribute(llama64, batch, quantities)
    _, A_w = attribute(llama64, batch, quantities, weights=w)
    assert not torch.allclose(A_all, A_w)
    assert [p.requires_grad for p in llama64.parameters()] == flags
    assert all(p.grad is None for p in llama64.parameters()), "no weight gradient is computed"


def test_a_vlm_is_attributed_from_its_language_model_embeddings():
    """Qwen2-VL: the image goes through the vision tower without a graph; A is finite."""
    from culture_neurons.testing.tiny import tiny_batch, tiny_processor

    model = tiny_model("qwen2_vl")
    inputs = dict(tiny_batch("qwen2_vl", tiny_processor("qwen2_vl"), n=2, padding_side="left"))
    q, A = attribute(model, inputs, lambda out: out.logits[:, -1, :2])
    assert A.shape[:2] == (2, 2) and torch.isfinite(A).all() and A.abs().sum() > 0


def test_refused_while_an_instrument_is_attached(llama64, batch):
    with cn.record(llama64, ["a"]), pytest.raises(UsageError, match="detach it first"):
        attribute(llama64, batch, quantities_of(batch))
    attribute(llama64, batch, quantities_of(batch))  # detached: fine again


@pytest.mark.parametrize("family", ["llama", "qwen2_vl", "llava_next", "gemma3"])
def test_checkpointing_gives_the_same_attribution_and_restores_the_layers(family):
    """Recomputing each layer in its backward (the default) attributes exactly as keeping every
    layer's graph; afterwards every decoder layer's forward is the class's again."""
    from culture_neurons.testing.tiny import tiny_batch, tiny_processor

    model = tiny_model(family)
    inputs = dict(tiny_batch(family, tiny_processor(family), n=2, padding_side="right"))
    quantities = lambda out: out.logits[:, -1, :3]  # noqa: E731
    q0, A0 = attribute(model, inputs, quantities, checkpoint=False)
    q1, A1 = attribute(model, inputs, quantities)
    assert A0.abs().sum() > 0
    torch.testing.assert_close(A1, A0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q1, q0, rtol=0, atol=0)
    layers = adapters.get_adapter(model).decoder_layers(model)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_a_forward_set_on_the_instance_is_restored(llama64, batch):
    """accelerate's device-map hooks put a forward on the instance: it is put back as it was."""
    layer = adapters.get_adapter(llama64).decoder_layers(llama64)[0]
    calls = []

    def wrapped(*args, _forward=layer.forward, **kwargs):
        calls.append(1)
        return _forward(*args, **kwargs)

    layer.forward = wrapped
    try:
        _, A = attribute(llama64, batch, quantities_of(batch))
        assert layer.forward is wrapped and calls, "the wrapper ran and is still in place"
        _, A_plain = attribute(llama64, batch, quantities_of(batch), checkpoint=False)
        torch.testing.assert_close(A, A_plain)
    finally:
        del layer.forward


@pytest.mark.parametrize("elements", [2 * 64 * 7, 200])  # chunks of rows; of tokens in a row
def test_the_reduction_in_chunks_equals_one_sum(monkeypatch, elements):
    from culture_neurons.instrument import attribution

    gen = torch.Generator().manual_seed(3)
    a, grad = torch.randn(5, 7, 64, generator=gen), torch.randn(5, 7, 64, generator=gen)
    w = (torch.rand(5, 7, generator=gen) > 0.3).long()
    grad[0, 6] = float("nan")  # a padded position's NaN gradient is left out, not summed
    w[0, 6] = 0
    want = torch.einsum("btn,btn,bt->bn", a, grad.nan_to_num(), w.float())
    monkeypatch.setattr(attribution, "CHUNK_ELEMENTS", elements)
    torch.testing.assert_close(attribution._reduce(a, grad, w), want)
