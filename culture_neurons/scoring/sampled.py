"""Which items ``--matrix sample`` computes (SPEC "Matrix modes"): every item under its own
culture's sets (the diagonal, exact) and a share of each culture's items, the same for every
set, under every other culture's sets (the off-diagonal cells, means over that share).

The share is drawn before any set is evaluated, from the items' ids and the run's seed alone:
it does not depend on what the sets do, and it is the same for a method and its RND draws, so
the tests against RND stay exact (:mod:`culture_neurons.scoring.random_control`) and the
bootstrap resamples within the two strata of each culture (:func:`strata`, also the groups the
matrix runs in). The cost per set
of culture s: its own items plus the share of the others', ``n_s + f (n - n_s)`` of the
``n`` prefills exact runs (1/C + f (C - 1)/C of them with equal cultures).
"""

from __future__ import annotations

import math

import torch

from culture_neurons.data import stable_seed
from culture_neurons.errors import UsageError

MIN_SAMPLED = 2  # items per culture in the share at least: a variance needs two


def sample_size(items: int, share: float) -> int:
    """Items of a culture of ``items`` in the share ``share`` (at least MIN_SAMPLED, at most
    all)."""
    # round up, but not a float's last bit: 0.07 x 100 is 7.000000000000001, 7 items
    return min(items, max(MIN_SAMPLED, math.ceil(round(share * items, 9))))


def choose(ids: list[str], culture: torch.Tensor, C: int, share: float, seed: int) -> torch.Tensor:
    """bool [n]: the items in the share, per culture the :func:`sample_size` ones first in an
    order seeded by ``seed`` and each item's id alone (the same whatever order the items come
    in, on every rank and on resume).

    Raises:
        UsageError: ``share`` not in (0, 1].
    """
    if not 0 < share <= 1:
        raise UsageError(f"the sample share must be in (0, 1] (--sample-share: (0, 1)), got "
                         f"{share!r}")  # fmt: skip
    culture = torch.as_tensor(culture, dtype=torch.int64)
    rank = torch.tensor([stable_seed("sample", seed, i) for i in ids], dtype=torch.int64)
    chosen = torch.zeros(len(ids), dtype=torch.bool)
    for c in range(C):
        members = torch.nonzero(culture == c).flatten()
        if members.numel():
            k = sample_size(members.numel(), share)
            order = members[torch.argsort(rank[members], stable=True)]
            chosen[order[:k]] = True
    return chosen


def computed(chosen: torch.Tensor, culture: torch.Tensor, sets: int, C: int) -> torch.Tensor:
    """bool [sets, n]: whether item i is computed under set s (set s of culture ``s % C``, the
    order of :func:`culture_neurons.pipeline.matrix.combine`): its own culture's sets, and
    every set where the item is in the share."""
    own = (torch.arange(sets) % C)[:, None] == torch.as_tensor(culture)[None, :]
    return own | chosen[None, :]


def strata(chosen: torch.Tensor, culture: torch.Tensor) -> torch.Tensor:
    """int64 [n]: 2c for culture c's items outside the share, 2c + 1 for its share."""
    return 2 * torch.as_tensor(culture, dtype=torch.int64) + chosen.long()
