"""``--matrix screen``: which cells of the ablation matrix are computed exactly, and the matrix
they make with the estimate (SPEC "Matrix modes").

A cell is (set s, evaluated culture c): set s's intervention on culture c's evaluation items.
The estimate (:mod:`culture_neurons.scoring.estimate`) gives every cell at the cost of one
forward and backward per batch of items; the exact matrix costs one prefill per item and
condition. Screening confirms exactly, for every mask (each method's and each RND draw's C
sets), its diagonal (what self and the gap rest on) and the ``budget`` off-diagonal cells the
estimate finds most affected (the task's :meth:`effect`: the share of changed answers, or the
size of the NLL change), and keeps the estimate elsewhere. RND draws are screened like the
methods, so a method and its null mix exact and estimated cells alike.

Symbols: S sets (masks x C, in :func:`culture_neurons.pipeline.matrix.combine`'s order: mask i's
set of culture j is row i * C + j), C cultures, n evaluation items.
"""

from __future__ import annotations

import torch


def confirmed_cells(effect: torch.Tensor, C: int, budget: int) -> torch.Tensor:
    """``[S, C]`` bool: the cells computed exactly. ``effect`` ``[S, C]``: how much the
    estimate says each cell changes (larger = more affected; NaN: no items, never chosen).
    Ties go to the first cell in row-major order, so the choice is deterministic."""
    S = effect.shape[0]
    if S % C:
        raise ValueError(f"{S} sets are not whole masks of {C} cultures")
    diag = torch.eye(C, dtype=torch.bool)
    confirmed = diag.repeat(S // C, 1)
    for i in range(0, S, C):
        score = effect[i : i + C].double().where(~diag, float("nan")).flatten()
        ranked = [j for j in torch.argsort(score.nan_to_num(-1.0), descending=True,
                                           stable=True).tolist()
                  if not torch.isnan(score[j])][:budget]  # fmt: skip
        block = confirmed[i : i + C].flatten()
        block[ranked] = True
        confirmed[i : i + C] = block.view(C, C)
    return confirmed


def conditions(confirmed: torch.Tensor, cultures: list[int]) -> list[int]:
    """The conditions an item group of ``cultures`` (indices) needs exactly: the full model
    (-1) and every set confirmed on one of them."""
    needed = confirmed[:, sorted(set(cultures))].any(dim=1)
    return [-1, *torch.nonzero(needed).flatten().tolist()]


def combine(exact: torch.Tensor, estimated: torch.Tensor, confirmed: torch.Tensor,
            culture: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``[1 + S, n]``: row 0 and the confirmed cells' items from ``exact``, every other item
    from ``estimated`` (already put onto the exact full model's scores, see the tasks'
    ``onto``)."""
    take = confirmed[:, culture]  # [S, n]: item i of culture c under set s is exact
    return torch.cat([exact[:1], torch.where(take, exact[1:], estimated[1:])])
