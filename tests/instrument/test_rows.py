"""Per-row ids and per-forward counts against loops written here, on random ids and masks."""

from __future__ import annotations

import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.instrument import rows as rows_module
from culture_neurons.instrument.rows import (
    check_ids,
    count_per_culture,
    item_counts,
    item_rows,
    row_ids,
    token_weights,
)


def loop_counts(ids: list[int], mask: torch.Tensor, C: int) -> torch.Tensor:
    """[2, C]: tokens where the mask is set, and items, of each culture."""
    out = torch.zeros(2, C, dtype=torch.int64)
    for b, c in enumerate(ids):
        if 0 <= c < C:
            out[0, c] += int(mask[b].sum())
            out[1, c] += 1
    return out


@pytest.mark.parametrize("seed", range(5))
def test_item_counts_equal_a_loop_and_the_rows_counted_one_by_one(seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, C = 9, 13, 4
    ids = torch.randint(-3, C + 3, (B,), generator=gen)  # < -1 and >= C: not counted
    mask = torch.rand(B, T, generator=gen) < 0.7
    counts = item_counts(ids, C, mask.sum(1))
    assert counts.dtype == torch.int64 and counts.shape == (2, C)
    assert torch.equal(counts, loop_counts(ids.tolist(), mask, C))
    assert torch.equal(item_counts(ids.tolist(), C, mask.sum(1)), counts)  # Python ints
    # The tokens column is what counting the forward's rows gives (what T used to be).
    rows = row_ids(ids.clamp(-1, C), (B, T), mask).reshape(-1)
    assert torch.equal(counts[0], count_per_culture(rows, C))


def test_bool_weights_skip_their_check_and_give_the_int_weights_rows():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 5, (6,), generator=gen)
    mask = torch.rand(6, 11, generator=gen) < 0.5
    assert torch.equal(row_ids(ids, mask.shape, mask), row_ids(ids, mask.shape, mask.long()))
    with pytest.raises(UsageError, match="0 or 1"):
        row_ids(ids, mask.shape, mask.long() * 2)


def test_check_ids_names_the_range_it_wants():
    check_ids(torch.tensor([-1, 0, 4]), 5, "culture", "not counted")
    for bad in ([-2, 0], [0, 5]):
        with pytest.raises(UsageError, match=r"\[-1, 4\]"):
            check_ids(torch.tensor(bad), 5, "culture", "not counted")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_item_rows_are_row_ids_and_item_counts_whatever_the_path(native, seed, monkeypatch):
    """The rows and counts of a forward (set_batch's one call per forward) equal ``row_ids``'
    and ``item_counts``' on random ids and masks, for ids as Python ints (the C++ call where
    it is built) and as a tensor (PyTorch)."""
    if native and rows_module.NATIVE is None:
        pytest.skip("culture_neurons.kernels._accumulate not built")
    if not native:
        monkeypatch.setattr(rows_module, "NATIVE", None)
    gen = torch.Generator().manual_seed(seed)
    B, T, C = 7, 19, 5
    ids = torch.randint(-1, C, (B,), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.6
    want_rows = row_ids(ids, (B, T), mask).reshape(-1)
    want_counts = loop_counts(ids.tolist(), mask, C)
    # ids as Python ints and as a tensor; the bool mask, and the attention mask as given
    # (int64, scope "all") and as floats (never read by its bits)
    for given in (ids.tolist(), ids):
        for weights in (mask, mask.long(), mask.int(), mask.float()):
            rows, counts = item_rows(given, weights, C)
            assert rows.dtype == torch.int32 and counts.dtype == torch.int64
            assert torch.equal(rows.long(), want_rows) and torch.equal(counts, want_counts)


@pytest.mark.parametrize("native", [False, True])
def test_item_rows_refuse_ids_that_do_not_match_the_mask(native, monkeypatch):
    """One id per row of the mask, else a UsageError (the C++ call would read past the mask)."""
    if not native:
        monkeypatch.setattr(rows_module, "NATIVE", None)
    mask = torch.ones(3, 5, dtype=torch.long)
    for ids in ([0, 1, 2, 0], torch.tensor([0, 1])):
        with pytest.raises(UsageError, match="same \\[B, T\\] shape"):
            item_rows(ids, mask, 3)


@pytest.mark.skipif(rows_module.NATIVE is None, reason="culture_neurons.kernels._accumulate not built")
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_the_extension_reads_masks_of_every_integer_width(dtype):
    """``NATIVE.item_rows`` counts a token wherever the mask is nonzero, for 1-, 4- and
    8-byte masks (an attention mask as the processor gives it, or a bool one)."""
    gen = torch.Generator().manual_seed(11)
    B, T, C = 5, 9, 4
    mask = (torch.rand(B, T, generator=gen) < 0.5).to(dtype)
    ids = [2, -1, 0, 3, 2]
    rows = torch.empty(B * T, dtype=torch.int32)
    counts = torch.zeros(2, C, dtype=torch.int64)
    rows_module.NATIVE.item_rows(mask.data_ptr(), mask.element_size(), ids, T, C, rows.data_ptr(),
                                 counts.data_ptr())  # fmt: skip
    assert torch.equal(rows.long(), row_ids(torch.tensor(ids), (B, T), mask.bool()).reshape(-1))
    assert torch.equal(counts, loop_counts(ids, mask.bool(), C))


@pytest.mark.parametrize("scope", ["all", "text", "image", "last"])
def test_token_weights_count_the_tokens_a_loop_finds(scope):
    """Nonzero exactly where a loop written here counts a token, on a random left/right padded
    mask with image tokens; bool everywhere but under ``all``, which hands back the attention
    mask as given (what item_rows reads without a copy)."""
    gen = torch.Generator().manual_seed(5)
    B, T, image = 6, 12, 7
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(0, 4, (1,), generator=gen))
        if b % 2:
            mask[b, :pad] = 0  # left padding
        else:
            mask[b, T - pad:] = 0
    ids = torch.randint(0, 10, (B, T), generator=gen)
    got = token_weights(mask, ids, scope, (image,))
    want = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] != 0]
        for t in valid:
            is_image = int(ids[b, t]) == image
            want[b, t] = {"all": True, "text": not is_image, "image": is_image,
                          "last": t == valid[-1]}[scope]  # fmt: skip
    assert torch.equal(got != 0, want)
    assert got is mask if scope == "all" else got.dtype == torch.bool
