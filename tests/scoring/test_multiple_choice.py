"""Scoring, the vision reuse of ablation groups, and the metrics on hand-computed matrices."""

from __future__ import annotations

import math

import pytest
import torch

import culture_neurons as cn
from culture_neurons.data import make_synthetic_items
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.scoring.metrics import matrices, summaries
from culture_neurons.scoring.multiple_choice import Group, letter_scores
from culture_neurons.scoring.prompting import letter_token_ids, parse_letter
from culture_neurons.testing.tiny import VLM_FAMILIES, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def items():
    data = make_synthetic_items(cultures=3, items_per_culture=4, seed=0)
    return [it for c in data.cultures for it in data.items_by_culture[c]][:5]


def random_masks(model, n_sets=2, k=40, seed=0) -> Masks:
    fp = adapters.fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randperm(fp.num_layers * fp.num_neurons, generator=g)[:k] for _ in range(n_sets)]
    return Masks.from_sets([f"s{i}" for i in range(n_sets)], sets, fp)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_kept_embeddings_give_identical_predictions_and_logits(family, items):
    """A group's later conditions skip the processor and the vision tower: same answers."""
    model, processor = tiny_model(family), tiny_processor(family)
    masks = random_masks(model)
    conditions = [-1, 0, 1, 0]
    seen = {}
    with cn.ablate(model, masks) as ablator:
        for reuse in (True, False):
            group = Group(model, processor, items, reuse_vision=reuse)
            seen[reuse] = group.predict(conditions, ablator)
            if reuse:
                assert group.embeds is not None  # the first pass kept them
    assert torch.equal(seen[True], seen[False])
    assert torch.equal(seen[True][1], seen[True][3])  # same set, same answers


def test_vision_tower_and_rope_index_run_once_per_group(items):
    model, processor = tiny_model("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    calls, rope = [], []
    handle = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    original = model.model.get_rope_index

    def counted(*args, **kwargs):
        rope.append(1)
        return original(*args, **kwargs)

    model.model.get_rope_index = counted  # instance attribute: the 3D positions' Python loop
    with cn.ablate(model, random_masks(model)) as ablator:
        group = Group(model, processor, items)
        group.predict([-1, 0], ablator)
        group.predict([1, 1, 0], ablator)
    handle.remove()
    del model.model.get_rope_index
    assert len(calls) == 1 and len(rope) == 1
    assert group.positions is not None and group.positions.shape[-2:] == group.inputs[
        "input_ids"].shape  # fmt: skip


def test_logit_scoring_is_the_argmax_over_letter_tokens(items):
    model, processor = tiny_model("llava"), tiny_processor("llava")
    letters = letter_token_ids(processor)
    for letter, ids in zip("ABCD", letters, strict=True):
        tok = processor.tokenizer
        assert all(tok.decode([i]).strip() == letter for i in ids)
    group = Group(model, processor, items)
    with torch.no_grad():
        logits = model(**group.inputs).logits[:, -1, :]
    want = torch.stack([logits[:, ids].max(dim=1).values for ids in letters], dim=1).argmax(1)
    assert torch.equal(group.predict([-1])[0], want)
    assert letter_scores(torch.arange(10.0).view(1, 10), [[1, 9], [2], [3], [4]]).tolist() == [
        [9.0, 2.0, 3.0, 4.0]
    ]


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_generation_scoring_under_ablation(backend, items):
    model, processor = tiny_model("qwen2_vl"), tiny_processor("qwen2_vl")
    masks = random_masks(model, k=200)
    with cn.ablate(model, masks, backend=backend) as ablator:
        preds = Group(model, processor, items, scoring="generate", max_new_tokens=3).predict(
            [-1, 0], ablator
        )
    assert preds.shape == (2, len(items))
    assert ((preds >= -1) & (preds <= 3)).all()


def test_generation_ablation_equals_between_backends(items):
    model, processor = tiny_model("gemma3"), tiny_processor("gemma3")
    masks = random_masks(model, k=300)
    out = {}
    for backend in ("hooks", "fused"):
        with cn.ablate(model, masks, backend=backend) as ablator:
            group = Group(model, processor, items[:2], scoring="generate", max_new_tokens=4)
            inputs = group._repeat(1)
            ablator.set_batch(None, set_ids=[0, 1], **inputs)
            with torch.no_grad():
                out[backend] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            ablator.clear_batch()
    assert torch.equal(out["hooks"], out["fused"])


@pytest.mark.parametrize(
    "text, want",
    [("B", 1), ("Answer: C.", 2), ("(D) because", 3), ("A", 0), ("Bread", -1), ("none", -1),
     (" a", -1), ("The answer is A", 0)],
)  # fmt: skip
def test_parse_letter(text, want):
    assert parse_letter(text) == want


def test_matrices_by_hand():
    # 2 cultures; items 0, 1 of culture 0, items 2, 3 of culture 1; labels 0 1 2 3.
    labels = torch.tensor([0, 1, 2, 3])
    culture = torch.tensor([0, 0, 1, 1])
    full = torch.tensor([0, 1, 2, 0])  # culture 0: 2/2 right, culture 1: 1/2 right
    pred = torch.tensor([
        [3, 1, 2, 0],   # set 0: culture 0 loses one item, culture 1 unchanged
        [0, 1, 2, 3],   # set 1: culture 1 gains one (a changed prediction that is right)
    ])  # fmt: skip
    m = matrices(full, pred, culture, 2, labels)
    assert m["accuracy_full"].tolist() == [100.0, 50.0]
    assert m["accuracy"].tolist() == [[50.0, 50.0], [100.0, 100.0]]
    assert m["delta"].tolist() == [[-50.0, 0.0], [0.0, 50.0]]
    assert m["flip"].tolist() == [[0.5, 0.0], [0.0, 0.5]]
    s = {k: v.item() for k, v in summaries(m["delta"]).items()}
    assert (s["self"], s["cross"], s["gap"]) == (0.0, 0.0, 0.0)
    assert math.isnan(s["specificity"])  # no net effect: no share of it
    s = summaries(torch.tensor([[-30.0, -10.0, 0.0], [-5.0, -20.0, -5.0], [0.0, 0.0, -10.0]]))
    assert s["self"].item() == -20.0 and s["cross"].item() == pytest.approx(-20 / 6)
    assert s["gap"].item() == pytest.approx(-20.0 + 20 / 6)


def test_hidden_labels_give_flips_only():
    m = matrices(torch.tensor([0, 1]), torch.tensor([[0, 2]]), torch.tensor([0, 0]), 1, None)
    assert m["accuracy"] is None and m["delta"] is None and m["flip"].tolist() == [[0.5]]


def test_a_culture_without_items_leaves_nan_cells_not_nan_summaries():
    delta = torch.tensor([[-10.0, float("nan")], [0.0, float("nan")]])
    s = summaries(delta)
    assert s["self"].item() == -10.0 and s["cross"].item() == 0.0
