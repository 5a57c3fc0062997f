"""Per-row ids: which token rows count for which culture, and which ablation set each row takes.

Token weights are 0/1 (SPEC "Token weights"), so instead of a weight tensor every backend gets
one id per flattened token row: the row's culture where ``w_t = 1`` and -1 where it is not
counted (padding, positions outside the scope, items of no culture). ``[B, T]`` inputs flatten
to ``B*T`` rows in the order the decoder MLP sees them. Ablation works the same way: one set
id per row (``set_ids``), -1 = no ablation.

Ids may be given per row (``[...]``, the activations' leading dims) or per item (a prefix such
as ``[B]`` of ``[B, T]``) and are then repeated over the remaining dims; an int applies to every
row. Value checks read the data, so they run on CPU tensors only (elsewhere they would cost a
device sync); the kernels ignore out-of-range ids rather than write out of bounds. Ids move to
the activations' device with :func:`on_device`, never by a blocking copy (that synchronises
the device): nothing here waits for the GPU.
"""

from __future__ import annotations

import torch

from culture_neurons.errors import UsageError
from culture_neurons.kernels.reduce import NATIVE
from culture_neurons.stats import SCOPES, check_choice


def token_weights(
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    scope: str = "all",
    image_token_ids: tuple[int, ...] = (),
    shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``[B, T]``, nonzero where a token counts: bool, but under ``all`` a given attention mask
    as it is (its nonzero tokens are the non-pad ones; set_batch runs this every forward, and
    :func:`item_rows` reads a mask of any integer width without a bool copy).

    ``all``: every non-pad token (image tokens included); ``text``: non-pad, non-image;
    ``image``: image tokens only; ``last``: the last non-pad position of each row (the answer
    position after a prompt, under left or right padding).
    """
    check_choice("scope", scope, SCOPES)
    if scope == "all" and attention_mask is not None:
        return attention_mask
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


def on_device(x, device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` (a tensor, or ints / a list of them, which start on the CPU) on ``device`` (None:
    where it is). A CPU-to-GPU copy is issued without waiting: torch's blocking copy (and
    ``torch.tensor(..., device="cuda")``) synchronises the stream, once per layer per call
    here. Safe from pageable memory, which the driver stages before returning."""
    x = torch.as_tensor(x)
    if device is None or x.device == torch.device(device):
        return x
    return x.to(device, non_blocking=True)


def per_row(x: torch.Tensor | int, lead: torch.Size, name: str, device=None) -> torch.Tensor:
    """``x`` repeated to the leading dims ``lead``: ``x.shape`` must be a prefix of ``lead``."""
    x = on_device(x, device)
    if tuple(lead[: x.dim()]) != tuple(x.shape):
        raise UsageError(
            f"{name} has shape {tuple(x.shape)}, which is not a prefix of the activations' leading "
            f"dims {tuple(lead)}; give one value per row ({tuple(lead)}) or per item "
            f"({tuple(lead[:1])})"
        )
    return x.reshape(*x.shape, *([1] * (len(lead) - x.dim()))).expand(lead)


def check_ids(ids: torch.Tensor, count: int, what: str, none: str) -> torch.Tensor:
    """``ids`` (integers) in ``[-1, count)``, else a UsageError naming ``what`` they index;
    ``none`` says what -1 means. The range is checked on CPU tensors only (no device sync)."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise UsageError(f"{what} ids must be integers, got {ids.dtype}; -1 = {none}")
    if ids.device.type == "cpu" and ids.numel():
        check_id_range(*(int(v) for v in torch.aminmax(ids)), count, what, none)
    return ids


def check_id_range(lo: int, hi: int, count: int, what: str, none: str) -> None:
    """The range check of :func:`check_ids` on ids whose smallest and largest are known
    (e.g. a Python list's: no tensor op)."""
    if lo < -1 or hi >= count:
        raise UsageError(
            f"{what} ids must be in [-1, {count - 1}] ({count} {what}s), got [{lo}, {hi}]; "
            f"-1 = {none}"
        )


def row_ids(
    culture: torch.Tensor | int,
    lead: torch.Size | tuple[int, ...],
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 culture id per row ``lead`` (e.g. ``[B, T]``): ``culture`` where ``weights`` is 1,
    ``-1`` (not counted) where it is 0 or ``culture`` is -1.

    Args:
        culture: ``[...]`` int, or a prefix of ``lead`` (per item), or an int; -1 = not counted.
        lead: the leading dims of the activations (their shape without the last dim N).
        weights: ``[...]`` 0/1 (bool, int or float; a prefix of ``lead`` too), None = all 1.

    Raises:
        UsageError: a shape that is not a prefix of ``lead``; weights other than 0/1 (checked
            on CPU tensors only).
    """
    lead = torch.Size(lead)
    ids = per_row(culture, lead, "culture", device)
    if ids.is_floating_point():
        raise UsageError(f"culture ids must be integers, got {ids.dtype}; -1 = not counted")
    ids = ids.long()
    if weights is None:
        return ids
    w = per_row(weights, lead, "weights", ids.device)
    if w.dtype == torch.bool:  # 0/1 by its type (token_weights' masks): nothing to check
        return torch.where(w, ids, -1)
    if w.device.type == "cpu" and bool(((w != 0) & (w != 1)).any()):
        raise UsageError(
            "token weights must be 0 or 1 (SPEC: w_t in {0, 1}), got other values; pass the "
            "attention mask or a bool mask of the tokens to count"
        )
    return torch.where(w != 0, ids, -1)


def count_per_culture(ids: torch.Tensor, C: int) -> torch.Tensor:
    """int64 ``[C]`` on ``ids``' device: how many of ``ids`` are c, for every c (-1 and ids
    >= C are not counted). No host sync (unlike ``bincount`` on CUDA, which reads the max)."""
    ids = ids.reshape(-1).long()
    slot = torch.where((ids >= 0) & (ids < C), ids, C)
    counts = torch.zeros(C + 1, dtype=torch.int64, device=ids.device)
    counts.index_add_(0, slot, torch.ones_like(slot))
    return counts[:C]


def item_counts(ids: torch.Tensor | list[int], C: int, tokens: torch.Tensor) -> torch.Tensor:
    """int64 ``[2, C]`` on ``ids``' device: per culture c, the counted tokens (row 0: the sum
    of ``tokens [B]``, each item's) and the number (row 1) of the items whose id is c, for one
    culture id per item (``ids [B]``; -1 and ids >= C are not counted): the ``(T, items)`` a
    forward adds (:meth:`Totals.count_block`'s layout). What :func:`count_per_culture` gives
    over the rows of :func:`row_ids`, from ``[B]`` values: a few small ops per forward
    instead of a pass over its ``B*T`` rows. ``ids`` as Python ints (with CPU ``tokens``):
    counted in Python, one tensor op (each op counts on a small model: bench_record)."""
    if isinstance(ids, list):
        tokens_of, items_of = [0] * C, [0] * C
        for c, t in zip(ids, tokens.tolist(), strict=True):
            if 0 <= c < C:
                tokens_of[c] += t
                items_of[c] += 1
        return torch.tensor([tokens_of, items_of], dtype=torch.int64)
    # Slot c + 1 for culture c; the uncounted go to 0 (ids < 0) and C + 1 (ids >= C). Few
    # ops, and no bool ones (slow on small CPU tensors): this runs once per forward.
    slot = (ids.reshape(-1).long() + 1).clamp_(0, C + 1)
    both = torch.ones(2, slot.shape[0], dtype=torch.int64, device=slot.device)
    both[0] = tokens.reshape(-1)
    counts = torch.zeros(2, C + 2, dtype=torch.int64, device=slot.device)
    return counts.index_add_(1, slot, both)[:, 1 : C + 1]


def item_rows(ids: torch.Tensor | list[int], weights: torch.Tensor,
              C: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A forward's row ids and counts from one culture id per item, on ``weights``' device:
    int32 ``[B*T]`` (:func:`row_ids`' rule: the item's id where its token counts, else -1) and
    int64 ``[2, C]`` (:func:`item_counts`), for ``ids [B]`` (in ``[-1, C)``; a tensor on
    ``weights``' device, or Python ints) and ``weights [B, T]``, nonzero where a token counts
    (:func:`token_weights`).

    Python ints with CPU weights: one call of the C++ extension (``csrc/accumulate.cpp``)
    where it is built, which writes both; every forward of the hooks backend runs this, and
    on a small model the dozen tensor ops of the PyTorch path are a measurable share of a
    forward (bench_record)."""
    B, T = weights.shape
    if len(ids) != B:  # e.g. an attention mask of another shape than input_ids
        raise UsageError(f"got {len(ids)} culture ids for a token mask of {B} rows "
                         f"({tuple(weights.shape)}); give input_ids and attention_mask of "
                         "the same [B, T] shape")  # fmt: skip
    on_cpu = weights.device.type == "cpu"
    if (isinstance(ids, list) and NATIVE is not None and on_cpu
            and not weights.is_floating_point() and weights.element_size() in (1, 4, 8)):  # fmt: skip
        w = weights.contiguous()
        rows = torch.empty(B * T, dtype=torch.int32)
        counts = torch.zeros(2, C, dtype=torch.int64)
        NATIVE.item_rows(w.data_ptr(), w.element_size(), ids, T, C, rows.data_ptr(),
                         counts.data_ptr())  # fmt: skip
        return rows, counts
    if isinstance(ids, list) and not on_cpu:  # counted where the weights are: no host sync
        ids = on_device(torch.tensor(ids, dtype=torch.int64), weights.device)
    weights = weights if weights.dtype == torch.bool else weights != 0
    counts = item_counts(ids, C, weights.sum(1))
    ids = on_device(ids, weights.device)
    return torch.where(weights, ids.view(-1, 1).int(), -1).view(-1), counts
