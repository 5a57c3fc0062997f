"""Tiny offline test models for every supported family (built by
:mod:`culture_neurons.models.tiny`, re-exported here) and the inputs tests feed them.

    model = tiny_model("qwen2_5_vl")
    processor = tiny_processor("qwen2_5_vl")
    logits = model(**tiny_batch("qwen2_5_vl", processor, padding_side="left")).logits
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw
from transformers import BatchFeature, PreTrainedTokenizerFast, ProcessorMixin

from culture_neurons.errors import UsageError
from culture_neurons.models.tiny import (
    TINY_FAMILIES,
    VLM_FAMILIES,
    TokenizerSpec,
    chat_template,
    corpus,
    special_tokens,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)

__all__ = [
    "TINY_FAMILIES",
    "VLM_FAMILIES",
    "TokenizerSpec",
    "chat_template",
    "corpus",
    "special_tokens",
    "tiny_batch",
    "tiny_config",
    "tiny_image",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
]

# Image sizes of the rows of tiny_batch: different aspect ratios so Qwen's dynamic resolution
# and LLaVA-NeXT's tiling give each row a different number of image tokens.
_BATCH_IMAGE_SIZES = ((64, 48), (112, 84), (40, 72))


def tiny_image(seed: int, size: int | tuple[int, int] = (64, 48)) -> Image.Image:
    """An RGB image (width, height) of random rectangles and ellipses on a random background."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = random.Random(seed)

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(rng.randrange(width) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height) for _ in range(2))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=colour())
    return image


_QUESTIONS = (
    "What is shown?",
    "Which traditional dish is shown in this picture?",
    "In which country is this famous festival with music and dance held every new year?",
    "What is the name of the building?",
)
_OPTIONS = ("rice", "bread", "soup", "tea", "temple", "market", "river", "mountain", "dance")


def tiny_batch(
    name: str,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    n: int = 3,
    seed: int = 0,
    padding_side: str = "right",
) -> BatchFeature:
    """`n` multiple-choice prompts of different lengths (one image each for VLMs), rendered by the
    chat template with the generation prompt and padded on `padding_side`. Keys are what
    model(**batch) takes: input_ids [B, T], attention_mask [B, T], plus the family's image
    tensors (pixel_values, image_grid_thw / image_sizes, mm_token_type_ids / token_type_ids)."""
    if padding_side not in ("left", "right"):
        raise UsageError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rng = random.Random(seed)
    is_vlm = name in VLM_FAMILIES
    conversations, images = [], []
    for i in range(n):
        options = rng.sample(_OPTIONS, 4)
        question = (
            _QUESTIONS[i % len(_QUESTIONS)]
            + "\n"
            + "\n".join(
                f"{letter}. {option}" for letter, option in zip("ABCD", options, strict=True)
            )
            + "\nAnswer with the option's letter from the given choices directly."
        )
        content = [{"type": "text", "text": question}]
        if is_vlm:
            content.insert(0, {"type": "image"})
            images.append([tiny_image(seed * 1000 + i, _BATCH_IMAGE_SIZES[i % 3])])
        conversations.append([{"role": "user", "content": content}])
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    tok = processor.tokenizer if is_vlm else processor
    old_side, tok.padding_side = tok.padding_side, padding_side
    try:
        if is_vlm:
            return processor(text=texts, images=images, return_tensors="pt", padding=True)
        return BatchFeature(dict(tok(texts, return_tensors="pt", padding=True)))
    finally:
        tok.padding_side = old_side
