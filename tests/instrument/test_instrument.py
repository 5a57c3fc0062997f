"""One Instrument per model: a second is refused (naming the live one), detaching in any order
restores the model exactly, and one Instrument records and ablates in the same pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import short_batch

import culture_neurons as cn
from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.testing.tiny import tiny_model

CULTURES = ["ja", "mx"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def masks_of(model) -> Masks:
    fp = adapters.fingerprint(model)
    total = fp.num_layers * fp.num_neurons
    return Masks.from_sets(["a", "b"], [torch.arange(0, total, 3), torch.arange(1, total, 5)], fp)


def mlp_state(model) -> list[dict]:
    """What attaching may touch: each decoder MLP's instance dict and its hook tables."""
    return [
        (dict(mlp.__dict__), dict(mlp.act_fn._forward_hooks), dict(mlp.down_proj._forward_pre_hooks))
        for mlp in adapters.decoder_mlps(model)
    ]


@pytest.mark.parametrize("first,second", list(itertools.product(["hooks", "fused"], repeat=2)))
def test_second_instrument_is_refused_naming_the_live_one(llama, first, second):
    before = mlp_state(llama)
    with cn.record(llama, CULTURES, backend=first) as rec:
        with pytest.raises(UsageError, match=rf"already carries Instrument\(recording 2 cultures, "
                                             rf"{first} backend, attached\)"):
            cn.ablate(llama, masks_of(llama), backend=second)
        assert "already" not in repr(rec)
    assert mlp_state(llama) == before, "the refused attach or the detach left something behind"


def test_after_detach_another_instrument_attaches(llama):
    rec = cn.record(llama, CULTURES)
    rec.detach()
    with cn.ablate(llama, masks_of(llama)) as abl:
        assert abl.attached
    assert not rec.attached and not abl.attached


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_detach_in_any_order_restores_the_model(llama, backend):
    inputs = short_batch()
    with torch.no_grad():
        plain = llama(**inputs).logits
    before = mlp_state(llama)
    rec = cn.record(llama, CULTURES, backend=backend)
    rec.detach()
    abl = cn.ablate(llama, masks_of(llama), backend=backend)
    rec.detach()  # detaching a detached instrument twice touches nothing
    abl.detach()
    abl.detach()
    assert mlp_state(llama) == before
    with torch.no_grad():
        assert torch.equal(llama(**inputs).logits, plain)


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_one_instrument_records_and_ablates_as_two_passes_would(llama, backend):
    """Recording under ablation in one pass equals recording on the ablated model alone, and
    its logits equal those of an ablation-only pass."""
    inputs, masks = short_batch(), masks_of(llama)
    culture, set_ids = [0, 1, 0], [1, -1, 0]
    with torch.no_grad():
        with cn.Instrument(llama, CULTURES, masks, backend=backend) as both:
            both_logits = both(culture, set_ids=set_ids, **inputs).logits
            both_stats = both.stats()
        with cn.ablate(llama, masks, backend=backend) as abl:
            abl_logits = abl(set_ids=set_ids, **inputs).logits
        with cn.Instrument(llama, CULTURES, masks, backend="hooks") as ref:
            ref(culture, set_ids=set_ids, **inputs)
            ref_stats = ref.stats()
    assert torch.equal(both_logits, abl_logits)
    assert torch.equal(both_stats.K, ref_stats.K) and torch.equal(both_stats.T, ref_stats.T)
    torch.testing.assert_close(both_stats.S, ref_stats.S, rtol=1e-5, atol=1e-6)


def test_the_old_ablate_keyword_is_refused_not_ignored(llama):
    with cn.ablate(llama, masks_of(llama)) as abl, pytest.raises(UsageError, match="set_ids"):
        abl(ablate=[0, 1, -1], **short_batch())


def test_print_shows_the_instrument_and_detach_removes_it(llama):
    with cn.record(llama, CULTURES, backend="hooks"):
        assert "[culture_neurons: hooks backend]" in repr(llama)
    assert "culture_neurons" not in repr(llama)


# --- steering: a := (1 + alpha) a on each row's set -----------------------------------------------


def steered_by_hand(model, inputs, masks: Masks, set_ids: list[int], alpha: float):
    """Logits with each row's set's neurons of act_fn's output multiplied by 1 + alpha, written
    as a plain forward hook with Python loops over the set's (layer, neuron) pairs."""
    mlps = adapters.decoder_mlps(model)

    def hook(layer):
        def scale(module, args, a):
            a = a.clone()
            for row, s in enumerate(set_ids):
                if s < 0:
                    continue
                for l, n in masks.pairs(s).tolist():
                    if l == layer:
                        a[row, :, n] = a[row, :, n] * (1 + alpha)
            return a

        return scale

    handles = [mlp.act_fn.register_forward_hook(hook(i)) for i, mlp in enumerate(mlps)]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("backend", ["hooks", "fused"])
@pytest.mark.parametrize("alpha", [0.5, -0.3])
def test_steering_equals_an_independent_hook(llama, backend, alpha):
    inputs, masks, set_ids = short_batch(), masks_of(llama), [1, -1, 0]
    want = steered_by_hand(llama, inputs, masks, set_ids, alpha)
    with cn.steer(llama, masks, alpha, backend=backend) as st, torch.no_grad():
        got = st(set_ids=set_ids, **inputs).logits
    # (1 + alpha) * act(g) * u against act(g) * (1 + alpha) * u: fp32 rounding order only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with cn.ablate(llama, masks, backend=backend) as ab, torch.no_grad():
        assert not torch.allclose(ab(set_ids=set_ids, **inputs).logits, got), "alpha had no effect"


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_steering_at_alpha_minus_one_is_ablation_exactly(llama, backend):
    inputs, masks, set_ids = short_batch(), masks_of(llama), [1, -1, 0]
    with torch.no_grad():
        with cn.steer(llama, masks, -1.0, backend=backend) as st:
            steered = st(set_ids=set_ids, **inputs).logits
        with cn.ablate(llama, masks, backend=backend) as ab:
            ablated = ab(set_ids=set_ids, **inputs).logits
    assert torch.equal(steered, ablated)
