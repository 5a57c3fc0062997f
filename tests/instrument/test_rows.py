"""Per-row ids and per-forward counts against loops written here, on random ids and masks."""

from __future__ import annotations

import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.instrument.rows import check_ids, count_per_culture, item_counts, row_ids


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
