"""The image-token budget (culture_neurons.models.image_budget) for every VLM family: no image
gets more tokens than the budget, prompt lengths from image headers stay exact, the model runs
on what the processor makes, and what cannot be met is refused with what to give."""

from __future__ import annotations

import pytest
import torch

from culture_neurons.data import make_synthetic_items
from culture_neurons.errors import UsageError
from culture_neurons.models import image_budget
from culture_neurons.scoring.prompting import encode, prompt_lengths
from culture_neurons.testing.tiny import VLM_FAMILIES, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def items():
    """Images of many shapes (aspect ratios up to 1:16), so the grids differ per item."""
    data = make_synthetic_items(cultures=2, items_per_culture=5, seed=3, image_size=(24, 400))
    return [it for c in data.cultures for it in data.items_by_culture[c]]


def encoded_lengths(model, processor, items) -> list[int]:
    return [int(encode(model, processor, [it])["input_ids"].shape[1]) for it in items]


def image_positions(model, processor, items) -> list[int]:
    """Image tokens each prompt really carries, counted in the processor's input_ids."""
    from culture_neurons.models.adapters import image_token_ids

    ids = torch.tensor(image_token_ids(model))
    return [int(torch.isin(encode(model, processor, [it])["input_ids"], ids).sum())
            for it in items]  # fmt: skip


# A budget each family can meet at its tiny sizes (real: Qwen tiles of 28 x 28 pixels, LLaVA-NeXT
# grids of 1,752..2,928 tokens, LLaVA-1.5 576 and Gemma 3 256 fixed).
BUDGETS = {"qwen2_vl": 9, "qwen2_5_vl": 9, "llava_next": 60, "llava_next_qwen2": 60,
           "llava": 16, "gemma3": 4}  # fmt: skip


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_a_budget_bounds_every_image_and_lengths_stay_exact(family, items):
    model, processor = tiny_model(family), tiny_processor(family)
    before = image_positions(model, processor, items)
    budget = BUDGETS[family]
    done = image_budget.apply(model, processor, budget)
    assert done["max_image_tokens"] == budget and done["how"]
    real = image_positions(model, processor, items)
    counted = image_budget.image_tokens(model, processor, [it.image_size for it in items])
    # Gemma 3 writes begin/end-of-image tokens around its fixed count: compare its count only.
    if family != "gemma3":
        assert counted == real
    assert max(real) <= budget, (family, real)
    assert prompt_lengths(model, processor, items) == encoded_lengths(model, processor, items)
    if family in ("qwen2_vl", "qwen2_5_vl", "llava_next", "llava_next_qwen2"):
        assert sum(real) < sum(before), "the budget changed nothing: choose a smaller one"
    else:
        assert real == before  # fixed count: nothing to limit
    with torch.no_grad():  # the model accepts what the budgeted processor makes
        out = model(**encode(model, processor, items[:3]))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_a_second_budget_starts_from_the_checkpoint_setting(family, items):
    model, processor = tiny_model(family), tiny_processor(family)
    sizes = [it.image_size for it in items]
    default = image_budget.image_tokens(model, processor, sizes)
    image_budget.apply(model, processor, BUDGETS[family])
    image_budget.apply(model, processor, 10_000)  # above the checkpoint's own maximum
    assert image_budget.image_tokens(model, processor, sizes) == default
    assert prompt_lengths(model, processor, items) == encoded_lengths(model, processor, items)


def test_qwen_budget_holds_for_any_aspect_ratio_up_to_the_budget():
    """max_pixels = N * 28 * 28 bounds the grid, except where one side would fall below one
    tile: only images longer than N times their width can exceed N (documented)."""
    model, processor = tiny_model("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    budget = 9
    image_budget.apply(model, processor, budget)
    gen = torch.Generator().manual_seed(0)
    sizes = [(int(h), int(w)) for h, w in torch.randint(28, 2000, (300, 2), generator=gen)
             if max(h, w) <= budget * min(h, w)]  # fmt: skip
    assert max(image_budget.image_tokens(model, processor, sizes)) <= budget


@pytest.mark.parametrize("family,budget,needed", [("llava", 15, "at least 16"),
                                                  ("gemma3", 3, "at least 4"),
                                                  ("llava_next", 51, "at least 52")])
def test_a_budget_below_what_the_family_can_do_is_refused(family, budget, needed):
    model, processor = tiny_model(family), tiny_processor(family)
    with pytest.raises(UsageError, match=needed):
        image_budget.apply(model, processor, budget)


def test_text_only_models_take_no_budget():
    model, tok = tiny_model("llama"), tiny_processor("llama")
    assert image_budget.apply(model, tok, None)["max_image_tokens"] is None
    with pytest.raises(UsageError, match="takes no images"):
        image_budget.apply(model, tok, 64)
    assert image_budget.image_tokens(model, tok, [(10, 10)]) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_a_budget_must_be_a_positive_int(bad):
    model, processor = tiny_model("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    with pytest.raises(UsageError, match="positive int"):
        image_budget.apply(model, processor, bad)
