"""Ablation metrics (SPEC "Evaluation"). Row s of a matrix is the ablated set (a culture's
neurons), column c' the evaluated culture. Accuracy is in percent, delta in points
(``acc_ablated - acc_full``), flip is the share of items whose predicted letter changed.

Summaries of a square ``[C, C]`` matrix: ``self`` = mean diagonal, ``cross`` = mean
off-diagonal, ``gap = self - cross``, and ``specificity``, the share of the summed *oriented*
effect (``sign x change``: harm, for ablation; ``sign`` = -1 for accuracy, +1 for NLL and flips)
that lands on the culture whose neurons were changed: ``self / (self + (C - 1) * cross)``
clipped to [0, 1] (1 = all of it, 1/C = spread evenly), NaN where the oriented total is not
positive (no harm to share; a set that helps its own culture never scores above 1). For
accuracy deltas a more negative self and gap mean a more selective method, for NLL deltas (the
LM task) and flips a more positive one. The gap grows with the total damage a set does; the
specificity does not. Whether a specificity is reported at all (its total's interval must
exclude 0) and its test: :mod:`culture_neurons.scoring.random_control`."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from culture_neurons import eval_schema

if TYPE_CHECKING:
    from culture_neurons.scoring.uncertainty import Bootstrap


NOT_COMPUTED = -2  # an MC score (letter index) not computed: never a prediction (-1 = unparseable)


def per_culture_mean(values: torch.Tensor, culture: torch.Tensor, C: int) -> torch.Tensor:
    """Mean of ``values`` [..., n] over the items of each culture: [..., C] (NaN if none);
    NaN values (not computed) are left out."""
    onehot = torch.zeros(C, culture.numel(), dtype=torch.float64)
    onehot[culture, torch.arange(culture.numel())] = 1
    values = values.double()
    computed = (~torch.isnan(values)).double()
    return (values.nan_to_num(0.0) @ onehot.T) / (computed @ onehot.T)


def matrices(
    pred_full: torch.Tensor,  # int64 [n] letter index of the full model, -1 unparseable
    pred: torch.Tensor,  # int64 [S, n] under each ablated set, NOT_COMPUTED where not run
    culture: torch.Tensor,  # int64 [n] culture index of each item
    C: int,
    labels: torch.Tensor | None,  # int64 [n], None when hidden
    boot: Bootstrap | None = None,
) -> dict:
    """``accuracy_full`` [C], ``accuracy`` / ``delta`` / ``flip`` [S, C] (None without labels);
    with ``boot``, the same on each of its B resamples: [B, C] and [B, S, C] (paired: every
    condition is averaged over the same resampled items). A cell is a mean over the items
    computed under its set (``--matrix sample``: a share of them off the diagonal), paired:
    ``delta`` is the mean of those items' own changes and ``accuracy`` the full model's plus it
    (the full model's accuracy, on all items, moved by the paired change)."""
    mean = _culture_mean(culture, C, boot)
    computed = pred != NOT_COMPUTED

    def paired(change: torch.Tensor) -> torch.Tensor:
        return mean(torch.where(computed, change.double(), torch.nan))

    flip = paired(pred != pred_full)
    out = {"flip": flip, "accuracy_full": None, "accuracy": None, "delta": None}
    if labels is not None:
        right_full = (pred_full == labels).double()
        full = 100 * mean(right_full)
        delta = 100 * paired((pred == labels).double() - right_full)
        out.update(accuracy_full=full, accuracy=full.unsqueeze(-2) + delta, delta=delta)
    return out


def _culture_mean(culture: torch.Tensor, C: int, boot: Bootstrap | None):
    """values [..., n] -> per-culture means [..., C], or [B, ..., C] over ``boot``'s resamples."""
    if boot is None:
        return lambda values: per_culture_mean(values, culture, C)
    return lambda values: boot.culture_means(values).movedim(-2, 0)


def per_culture_sum(values: torch.Tensor, culture: torch.Tensor, C: int) -> list[int]:
    """int per culture: the sum of ``values`` ``[n]`` over its items."""
    return torch.zeros(C, dtype=torch.int64).index_add_(0, culture, values.long()).tolist()


SUMMARIES = eval_schema.SUMMARIES  # the names the eval JSON keys them by


class RowParts(NamedTuple):
    """What the summaries need of each row s of square matrices [..., C, C]: every summary is
    a function of the row sums of ``diag`` and ``off``, so rows of different matrices (one
    culture's set from each of several draws) can be recombined (the test against random sets:
    :mod:`culture_neurons.scoring.random_control`)."""

    diag: torch.Tensor  # [..., C] the row's diagonal cell (0 where undefined)
    off: torch.Tensor  # [..., C] the sum of its defined off-diagonal cells
    n_diag: torch.Tensor  # [...] defined diagonal cells (the same for every set of a run)
    n_off: torch.Tensor  # [...] defined off-diagonal cells


def row_parts(m: torch.Tensor) -> RowParts:
    """:class:`RowParts` of square matrices ``m`` [..., C, C]; NaN cells (a culture without
    items) are left out."""
    diag = torch.diagonal(m, dim1=-2, dim2=-1)  # [..., C]
    defined = ~torch.isnan(m)
    on_diag = diag.nan_to_num(0.0)
    return RowParts(on_diag, m.nansum(-1) - on_diag, (~torch.isnan(diag)).sum(-1),
                    defined.sum((-2, -1)) - (~torch.isnan(diag)).sum(-1))  # fmt: skip


def from_parts(diag_sum: torch.Tensor, off_sum: torch.Tensor, n_diag, n_off,
               C: int, sign: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
    """The summaries from the sums over rows of :class:`RowParts` (see the module doc)."""
    s = diag_sum / n_diag  # nanmean: a culture without items leaves NaN cells
    c = off_sum / n_off if C > 1 else torch.full_like(s, torch.nan)
    total = sign * (s + (C - 1) * c)  # oriented: harm > 0
    # No net harm (<= 0 up to rounding: these are sums of a few fractions): share undefined.
    share = torch.where(total > 1e-12, (sign * s / total).clamp(0.0, 1.0), torch.nan)
    return {"self": s, "cross": c, "gap": s - c, "specificity": share}


def summaries(m: torch.Tensor, sign: int = 1) -> dict[str, torch.Tensor]:
    """``self``, ``cross``, ``gap``, ``specificity`` (of effects oriented by ``sign``) of square
    matrices ``m`` [..., C, C] (each [...]); NaN cells (a culture without items) are left out
    of the means."""
    parts = row_parts(m)
    return from_parts(parts.diag.sum(-1), parts.off.sum(-1), parts.n_diag, parts.n_off,
                      m.shape[-1], sign)  # fmt: skip


def nan_to_none(x):
    """JSON-ready: NaN (a culture without items) becomes None, in nested lists too."""
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return None if x != x else x
