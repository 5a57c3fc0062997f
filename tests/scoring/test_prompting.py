"""Prompt lengths without processing images: what encode() gives every family, exactly."""

from __future__ import annotations

import pytest

from culture_neurons.data import make_synthetic_items
from culture_neurons.scoring.prompting import encode, prompt_lengths
from culture_neurons.testing.tiny import TINY_FAMILIES, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def items():
    """Images of many shapes, so Qwen's dynamic resolution and LLaVA-NeXT's tiling give each
    prompt its own count of image tokens."""
    data = make_synthetic_items(cultures=2, items_per_culture=4, seed=2, image_size=(24, 400))
    return [it for c in data.cultures for it in data.items_by_culture[c]]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prompt_lengths_equal_the_encoded_prompts(family, items):
    model, processor = tiny_model(family), tiny_processor(family)
    want = [int(encode(model, processor, [it])["input_ids"].shape[1]) for it in items]
    assert prompt_lengths(model, processor, items) == want
    if family in ("qwen2_5_vl", "llava_next"):  # the image decides the length
        assert len(set(want)) > 2


def test_a_processor_that_cannot_count_from_sizes_runs_on_the_images(items):
    """The fallback (one warning): the processor on every image, still exact."""
    model, processor = tiny_model("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    want = prompt_lengths(model, processor, items)
    processor._get_num_multimodal_tokens = None  # as a processor without the method
    with pytest.warns(UserWarning, match="cannot count image tokens"):
        assert prompt_lengths(model, processor, items) == want
