"""Batches of similar prompt length: the order of the items, and the padding share against a
hand count of the padded token rows."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from culture_neurons.pipeline.batching import by_length, groups, padding_of, padding_share


@dataclass(frozen=True)
class It:
    id: str
    culture: str


def test_padding_share_counts_the_padded_rows_by_hand():
    # Batches of 3: [5, 9, 7] pads to 9 -> 4 + 0 + 2 = 6 of 27; [2, 2, 8] to 8 -> 12 of 24;
    # the last batch [4] alone pads nothing: 18 padded of 27 + 24 + 4 = 55 token rows.
    assert padding_share([5, 9, 7, 2, 2, 8, 4], 3) == pytest.approx(18 / 55, abs=0)
    assert padding_share([5, 9, 7], 1) == 0.0  # one prompt per forward pads nothing
    assert padding_share([3, 3, 3, 3], 2) == 0.0
    assert padding_share([], 4) == 0.0


def test_padding_share_of_random_batches_against_a_loop():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 40))]
        rows = rng.randint(1, 9)
        padded = real = 0
        for start in range(0, len(lengths), rows):
            batch = lengths[start : start + rows]
            for n in batch:
                padded += max(batch) - n
                real += n
        assert padding_share(lengths, rows) == pytest.approx(padded / (padded + real), rel=1e-12)


def test_padding_of_batches_of_any_size_is_padding_share_where_they_are_equal():
    rng = random.Random(2)
    for _ in range(50):
        batches = [[rng.randint(1, 400) for _ in range(rng.randint(1, 9))]
                   for _ in range(rng.randint(1, 8))]  # fmt: skip
        padded = sum(max(b) - n for b in batches for n in b)
        real = sum(map(sum, batches))
        assert padding_of(batches) == pytest.approx(padded / (padded + real), rel=1e-12)
        flat = [n for b in batches for n in b]
        assert padding_of([flat[s : s + 3] for s in range(0, len(flat), 3)]) == \
            pytest.approx(padding_share(flat, 3), abs=0)  # fmt: skip
    assert padding_of([]) == 0.0


def test_by_length_keeps_culture_shares_and_ignores_the_input_order():
    rng = random.Random(1)
    items = [It(f"{c}{i:02d}", c) for c in "xyz" for i in range(15)]
    length = {it.id: rng.randint(10, 30) for it in items}  # ties: the id decides
    order = by_length(items, [length[it.id] for it in items])
    got = [items[i] for i in order]
    assert sorted(order) == list(range(len(items)))
    assert [it.culture for it in got] == [c for c in "xyz" for _ in range(15)]
    for c in "xyz":
        share = [(length[it.id], it.id) for it in got if it.culture == c]
        assert share == sorted(share)
    shuffled = [it for c in "xyz" for it in rng.sample([i for i in items if i.culture == c], 15)]
    again = by_length(shuffled, [length[it.id] for it in shuffled])
    assert [shuffled[i] for i in again] == got
    # Sorting never pads more than the given order (here much less).
    before = padding_share([length[it.id] for it in items], 4)
    after = padding_share([length[it.id] for it in got], 4)
    assert after < before


@pytest.mark.parametrize("size", [1, 4, 7, 40])
def test_groups_cut_the_order_and_keep_one_culture_each_at_its_size(size):
    rng = random.Random(size)
    items = [It(f"{c}{i:02d}", c) for c, k in zip("xyz", (9, 1, 14), strict=True)
             for i in range(k)]  # fmt: skip
    order = by_length(items, [rng.randint(1, 9) for _ in items])
    plain = groups(items, order, size)
    assert [i for g in plain for i in g] == order
    n = len(order)
    assert [len(g) for g in plain] == [min(size, n - s) for s in range(0, n, size)]
    sizes = {"x": size, "y": rng.randint(1, 3), "z": rng.randint(1, 20)}
    split = groups(items, order, sizes)
    assert [i for g in split for i in g] == order  # the same order, cut at every culture too
    want = []  # a loop: a group ends at its culture's size or where the culture changes
    for i in order:
        culture = items[i].culture
        if not want or len(want[-1]) == sizes[culture] or items[want[-1][0]].culture != culture:
            want.append([])
        want[-1].append(i)
    assert split == want
    assert all(len({items[i].culture for i in g}) == 1 for g in split)
    assert groups(items, order, dict.fromkeys("xyz", size)) == [
        g for c in "xyz" for g in groups(items, [i for i in order if items[i].culture == c], size)]
