"""Token weights: which prompt positions count for the statistics (SPEC "Token weights").

Weights are 0/1, so instead of a weight tensor every backend gets one id per flattened token
row: the row's culture where ``w_t = 1`` and -1 where it is not counted (padding, positions
outside the scope, items of no culture). ``[B, T]`` inputs flatten to ``B*T`` rows in the
order the decoder MLP sees them.
"""

from __future__ import annotations

import torch

from .errors import UsageError
from .stats import SCOPES, check_choice


def token_weights(
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    scope: str = "all",
    image_token_ids: tuple[int, ...] = (),
    shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bool ``[B, T]``: True where a token counts.

    ``all``: every non-pad token (image tokens included); ``text``: non-pad, non-image;
    ``image``: image tokens only; ``last``: the last non-pad position of each row (the answer
    position after a prompt, under left or right padding).
    """
    check_choice("scope", scope, SCOPES)
    if attention_mask is None:
        if input_ids is None and shape is None:
            raise UsageError("give attention_mask or input_ids so that token weights can be built")
        size = input_ids.shape if input_ids is not None else shape
        device = input_ids.device if input_ids is not None else "cpu"
        attention_mask = torch.ones(size, dtype=torch.bool, device=device)
    valid = attention_mask.bool()
    if scope == "all":
        return valid
    if scope == "last":
        positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
        last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)
        return valid & (positions == last)
    if input_ids is None:
        raise UsageError(f"scope={scope!r} needs input_ids to find the image tokens")
    image = torch.zeros_like(valid)
    for token in image_token_ids:
        image |= input_ids == token
    return valid & (image if scope == "image" else ~image)


def row_cultures(culture: torch.Tensor | list[int], weights: torch.Tensor) -> torch.Tensor:
    """int32 ``[B*T]``: ``culture[b]`` where ``weights[b, t]``, else -1 (not counted)."""
    culture = torch.as_tensor(culture, dtype=torch.int32, device=weights.device).view(-1, 1)
    if culture.shape[0] != weights.shape[0]:
        raise UsageError(
            f"got {culture.shape[0]} culture ids for a batch of {weights.shape[0]} rows; "
            "give one id per row (-1 = not counted)"
        )
    return torch.where(weights, culture, -1).reshape(-1)
