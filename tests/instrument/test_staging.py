"""Staging: a forward records per item slot, commit(keep) adds the kept items into their
cultures. Against the independent reference on the kept items, and against recording the same
batches directly with the dropped items marked -1."""

from __future__ import annotations

import pytest
import torch
from conftest import short_batch
from stats_reference import assert_stats_equal, reference_stats

import culture_neurons as cn
from culture_neurons.errors import UsageError
from culture_neurons.instrument import Totals
from culture_neurons.stats import Fingerprint
from culture_neurons.testing.tiny import tiny_batch, tiny_model, tiny_processor

CULTURES = ["ja", "mx", "ng"]


@pytest.fixture(scope="module")
def qwen():
    model = tiny_model("qwen2_5_vl")
    processor = tiny_processor("qwen2_5_vl")
    batches = [dict(tiny_batch("qwen2_5_vl", processor, n=n, seed=seed, padding_side="left"))
               for n, seed in ((3, 0), (2, 1), (4, 2))]  # fmt: skip
    return model, batches


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_staged_and_committed_equals_the_reference_on_the_kept_items(qwen, backend):
    model, batches = qwen
    inputs = batches[0]
    culture, keep = [0, 2, 0], [True, False, True]
    with torch.no_grad():
        plain = model(**inputs).logits
    with cn.record(model, CULTURES, backend=backend) as rec, torch.no_grad():
        rec.set_batch(culture, stage=True, **inputs)
        logits = model(**inputs).logits
        rec.clear_batch()
        assert int(rec.stats().T.sum()) == 0, "staged rows are in no total before commit"
        rec.commit(torch.tensor(keep))
        stats = rec.stats()
    assert torch.equal(logits, plain), "staging changed the model's output"
    kept = [c if k else -1 for c, k in zip(culture, keep, strict=True)]
    assert_stats_equal(stats, reference_stats(model, inputs, kept, len(CULTURES)))
    assert stats.items.tolist() == [2, 0, 0]


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_batches_of_any_size_equal_direct_recording_of_the_kept_items(qwen, backend):
    """Three batches (3, then 2, then 4 items: the slots grow), an item of no culture that a
    keep of True must not count, a batch with nothing kept, and direct batches in between."""
    model, batches = qwen
    plan = [([1, 0, 2], [True, True, False]), ([2, -1], [False, True]),
            ([0, 1, 1, 2], [True, False, True, True]), ([1, 2, 0], [False, False, False])]  # fmt: skip
    inputs = batches + batches[:1]
    with torch.no_grad():
        with cn.record(model, CULTURES, backend=backend) as direct:
            for batch, (culture, keep) in zip(inputs, plan, strict=True):
                direct([c if k else -1 for c, k in zip(culture, keep, strict=True)], **batch)
            direct([2, 2, 2], **inputs[0])
            want = direct.stats()
        with cn.record(model, CULTURES, backend=backend) as rec:
            for i, (batch, (culture, keep)) in enumerate(zip(inputs, plan, strict=True)):
                rec.set_batch(culture, stage=True, **batch)
                model(**batch)
                rec.clear_batch()
                if i == 1:  # a direct batch while nothing is pending
                    rec([2, 2, 2], **inputs[0])
                rec.commit(keep)
            got = rec.stats()
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # fp64 sums of the same fp32 chunk sums, added per slot first: rounding of fp64 only.
    for name in ("S", "Q"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12,
                                   atol=1e-12)  # fmt: skip
    assert got.items.tolist() == [2, 2, 1 + 3]


def test_staging_is_refused_where_it_would_lose_or_invent_counts():
    model = tiny_model("llama")
    inputs = short_batch()
    with cn.record(model, CULTURES) as rec, torch.no_grad():
        with pytest.raises(UsageError, match="cultures"):
            rec.set_batch(None, stage=True, **inputs)
        with pytest.raises(UsageError, match="set_batch.*stage=True"):
            rec.commit([True] * 3)
        rec.set_batch([0, 1, 2], stage=True, **inputs)
        with pytest.raises(UsageError, match="has not run"):
            rec.commit([True] * 3)
        model(**inputs)
        with pytest.raises(UsageError, match="not committed"):
            rec.set_batch([0, 1, 2], stage=True, **inputs)
        with pytest.raises(UsageError, match="one bool per row .*\\(3\\), got 2"):
            rec.commit([True, False])
        rec.commit([False] * 3)  # drops it
        assert int(rec.stats().T.sum()) == 0
        rec.reset_stats()
    with cn.ablate(model, _masks(model)) as abl, pytest.raises(UsageError, match="without cultures"):
        abl.set_batch([0, 1, 2], stage=True, **inputs)


def _masks(model):
    from culture_neurons.masks import Masks
    from culture_neurons.models import adapters

    fp = adapters.fingerprint(model)
    return Masks.from_sets(["a"], [torch.arange(0, fp.num_layers * fp.num_neurons, 7)], fp)


def test_add_slots_against_a_loop():
    """Random slot sums (never zeros) into random totals, by a Python loop over the slots."""
    fp = Fingerprint("llama", "llama", 3, 13, 8, "silu", "test")
    gen = torch.Generator().manual_seed(3)
    totals, slots = Totals(CULTURES, fp), Totals([f"s{b}" for b in range(7)], fp)
    for layer in range(fp.num_layers):
        for t in (*totals.layer(layer, "cpu"), *slots.layer(layer, "cpu")):
            t.copy_(torch.randint(1, 50, t.shape, generator=gen) if not t.is_floating_point()
                    else torch.randn(t.shape, generator=gen, dtype=t.dtype))  # fmt: skip
    for t in (*totals.counts("cpu"), *slots.counts("cpu")):
        t.copy_(torch.randint(1, 50, t.shape, generator=gen))
    before, staged = totals.stats(), slots.stats()
    culture = torch.tensor([2, 0, -1, 2, 1])  # B = 5 of the 7 slots
    keep = torch.tensor([True, True, True, False, True])
    want = before.to("cpu", copy=True)
    for b in range(5):
        c = int(culture[b])
        if c < 0 or not keep[b]:
            continue
        for name in ("K", "S", "Q"):
            getattr(want, name)[c] += getattr(staged, name)[b]
        want.T[c] += staged.T[b]
        want.items[c] += 1
    totals.add_slots(slots, culture, keep)
    got = totals.stats()
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("S", "Q"):  # the same fp64 additions, in another order at most
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-14, atol=1e-14)
    cleared = slots.stats()
    assert all(int(getattr(cleared, n).abs().sum()) == 0 for n in ("T", "K", "S", "Q", "items"))
