"""Items in batches of similar prompt length: less padding prefilled for nothing.

CVQA's prompts differ in length mostly by their image (Qwen2.5-VL: one token per 28 x 28
pixels; LLaVA-NeXT: one tile grid per aspect ratio), and a padded batch prefills every row to
its longest prompt. Within each culture's share of the items (cultures keep their order, so
batches mix cultures only where one culture's items end), items are sorted by ``(prompt length,
id)``: the batches, and every number computed from them, are the same whatever order the items
came in; ``--matrix screen`` and ``sample`` also cut their groups where the culture (and the
sampled share) changes (:func:`groups`).
Lengths come from the task without processing any image (see
:func:`culture_neurons.scoring.prompting.prompt_lengths`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence


def by_length(items: Sequence, lengths: Sequence[int]) -> list[int]:
    """Positions of ``items`` in batching order: each culture's run of items (in the order the
    cultures first appear) sorted by ``(length, id)``."""
    cultures: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        cultures.setdefault(it.culture, []).append(i)
    return [i for share in cultures.values()
            for i in sorted(share, key=lambda i: (lengths[i], items[i].id))]  # fmt: skip


def groups(items: Sequence, order: Sequence[int], size: int | Mapping, key=None) -> list:
    """``order`` (positions of ``items``, :func:`by_length`) cut into groups of ``size``
    positions; ``size`` a mapping (group key -> its group size): each group holds items of one
    key only (a key's last group may be smaller), so that work needed on some items runs on
    theirs alone and fills its forwards. The key of position i: ``key(i)``, by default its
    item's culture (``--matrix screen`` confirms cells culture by culture); ``order`` must hold
    each key's positions together."""
    if isinstance(size, int):
        return [list(order[s : s + size]) for s in range(0, len(order), size)]
    key = key or (lambda i: items[i].culture)
    cut = []
    for k, run in itertools.groupby(order, key=key):
        cut += groups(items, list(run), size[k])
    return cut


def padding_share(lengths: Sequence[int], rows: int) -> float:
    """Padded share of the token rows when ``lengths`` (in batching order) are cut into
    batches of ``rows`` prompts, each padded to its longest: ``padded / (padded + real)``."""
    return padding_of([lengths[s : s + rows] for s in range(0, len(lengths), rows)])


def padding_of(batches: Sequence[Sequence[int]]) -> float:
    """Padded share of the token rows of ``batches`` (each a batch's prompt lengths, padded to
    its longest): ``padded / (padded + real)``."""
    total = padded = 0
    for batch in batches:
        total += len(batch) * max(batch)
        padded += len(batch) * max(batch) - sum(batch)
    return padded / total if total else 0.0
