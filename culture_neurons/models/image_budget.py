"""Image-token budget: at most ``max_tokens`` image tokens per image, the way each family's
processor allows (the adapter's ``image_budget`` names the mechanism).

Why: CVQA's photos range from thumbnails to 4000-pixel scans. Qwen2-VL / Qwen2.5-VL size
their grid from the pixels (default ``max_pixels`` 12,845,056: up to 16,384 tokens for one
image; a 2000 x 1500 photo gives 3,900), LLaVA-NeXT picks an any-res tile grid. Tokens per
item, and with them a run's cost, padding and memory, then depend on a setting nobody chose.

- ``pixels`` (Qwen2-VL, Qwen2.5-VL): every image is resized to a pixel count within
  ``[min_pixels, max_pixels]`` in tiles of ``(patch * merge)^2`` pixels (28 x 28 for the real
  models), one token each. A budget N sets ``max_pixels = N * tile`` (and ``min_pixels`` no
  higher): no image gets more than N tokens; smaller images keep their own size.
- ``pinpoints`` (LLaVA-NeXT, Pangea): the processor tiles an image on the best of its grid
  pinpoints. A budget keeps the pinpoints whose full grid has at most N tokens (an image's
  count never exceeds its grid's: unpadding only removes tokens), in the processor *and* the
  model's config, which recomputes the grid from them. Fewer than the smallest grid's tokens
  is refused, naming it.
- ``fixed`` (LLaVA-1.5, Gemma 3 without pan-and-scan): every image has the same count. A
  budget at least that count changes nothing (and is recorded as such); a smaller one is
  refused.

The counts come from the processor's own formula (``_get_num_multimodal_tokens``), so prompt
lengths computed from image headers (:func:`culture_neurons.models.adapters.expanded_prompts`)
stay exact under a budget.
"""

from __future__ import annotations

from culture_neurons.errors import UsageError
from culture_neurons.models import adapters

# What a budget leaves of the processor's own setting, kept on the processor the first time
# (so a second budget starts from the checkpoint's settings, not from the first budget's).
_ORIGINAL = "_culture_neurons_image_setting"


# Image tokens of an image of each (height, width), from the processor's own formula; None
# where it cannot count from sizes, and for text-only models (the one counting rule).
image_tokens = adapters.image_token_counts


def token_summary(model, processor, items: list, prompt_lengths: list[int]) -> dict:
    """Prompt tokens (``prompt_lengths``) and image tokens per item of ``items`` (mean, max) and
    the image tokens' share of all prompt tokens, padding aside (image tokens None where the
    processor cannot count them from sizes, or there are no images)."""
    import torch

    prompt = torch.tensor(prompt_lengths, dtype=torch.float64)
    out = {"items": len(items), "prompt_mean": float(prompt.mean()),
           "prompt_max": int(prompt.max()), "image_mean": None, "image_max": None,
           "image_share": None}  # fmt: skip
    # Text items have no image size to read: only a VLM's items are counted.
    counts = image_tokens(model, processor, [it.image_size for it in items]) \
        if items and adapters.get_adapter(model).vlm else None  # fmt: skip
    if counts:
        image = torch.tensor(counts, dtype=torch.float64)
        out.update(image_mean=float(image.mean()), image_max=int(image.max()),
                   image_share=float(image.sum() / prompt.sum()))  # fmt: skip
    return out


def apply(model, processor, max_tokens: int | None) -> dict:
    """Limit every image to ``max_tokens`` image tokens (None: the processor's default, left
    as it is). Changes ``processor`` (and, for ``pinpoints``, ``model.config``) in place;
    returns what was done, for run.json and the report: ``{"max_image_tokens", "how"}`` and
    the family's setting."""
    adapter = adapters.get_adapter(model)
    if max_tokens is None:
        return {"max_image_tokens": None, "how": "the processor's default"}
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max_image_tokens must be a positive int, got {max_tokens!r}")
    if not adapter.vlm:
        raise UsageError(f"--max-image-tokens {max_tokens} was given, but {adapter.family} "
                         "takes no images; leave it out for a text-only model")  # fmt: skip
    how = {"pixels": _pixels, "pinpoints": _pinpoints, "fixed": _fixed}[adapter.image_budget]
    return {"max_image_tokens": max_tokens, **how(model, processor, max_tokens)}


def _original(processor, read) -> object:
    image_processor = processor.image_processor
    if not hasattr(image_processor, _ORIGINAL):
        setattr(image_processor, _ORIGINAL, read(image_processor))
    return getattr(image_processor, _ORIGINAL)


def _pixels(model, processor, max_tokens: int) -> dict:
    ip = processor.image_processor
    lo, hi = _original(processor, lambda ip: (ip.size["shortest_edge"], ip.size["longest_edge"]))
    tile = (ip.patch_size * ip.merge_size) ** 2  # pixels per image token
    max_pixels = min(hi, max_tokens * tile)
    ip.size = {"shortest_edge": min(lo, max_pixels), "longest_edge": max_pixels}
    return {"how": f"max_pixels {max_pixels} ({tile} pixels per token)",
            "min_pixels": min(lo, max_pixels), "max_pixels": max_pixels}  # fmt: skip


def _pinpoints(model, processor, max_tokens: int) -> dict:
    everyone = [list(p) for p in _original(processor, lambda ip: ip.image_grid_pinpoints)]
    tokens = _grid_tokens(model, processor, everyone)
    kept = [p for p, n in zip(everyone, tokens, strict=True) if n <= max_tokens]
    if not kept:
        raise UsageError(f"--max-image-tokens {max_tokens} is below the smallest tile grid of "
                         f"this model ({min(tokens)} tokens for pinpoint "
                         f"{everyone[tokens.index(min(tokens))]}); give at least {min(tokens)}")  # fmt: skip
    processor.image_processor.image_grid_pinpoints = kept
    config = model.config  # the model recomputes each image's grid from these
    config.image_grid_pinpoints = kept
    return {"how": f"grid pinpoints with at most {max_tokens} tokens: {len(kept)} of "
            f"{len(everyone)}", "image_grid_pinpoints": kept}  # fmt: skip


def _grid_tokens(model, processor, pinpoints: list[list[int]]) -> list[int]:
    """The most tokens an image tiled on each pinpoint can get: an image of exactly its size
    (no padding to remove), counted on the full pinpoint list."""
    ip = processor.image_processor
    current = ip.image_grid_pinpoints
    ip.image_grid_pinpoints = pinpoints
    try:
        return image_tokens(model, processor, [tuple(p) for p in pinpoints])
    finally:
        ip.image_grid_pinpoints = current


def _fixed(model, processor, max_tokens: int) -> dict:
    counts = image_tokens(model, processor, [(336, 336)])  # any size: the count is fixed
    if counts is None:  # pan-and-scan: the crops depend on the pixels
        raise UsageError("this processor crops images by their content (pan-and-scan), so no "
                         "budget can be set from sizes; turn pan-and-scan off or leave "
                         "--max-image-tokens out")  # fmt: skip
    fixed = counts[0]
    if max_tokens < fixed:
        raise UsageError(f"--max-image-tokens {max_tokens} is below this model's fixed "
                         f"{fixed} tokens per image; give at least {fixed} (or leave it out)")  # fmt: skip
    return {"how": f"fixed at {fixed} tokens per image (nothing to limit)", "fixed": fixed}
