"""Ablation metrics (SPEC "Evaluation"). Row s of a matrix is the ablated set (a culture's
neurons), column c' the evaluated culture. Accuracy is in percent, delta in points
(``acc_ablated - acc_full``), flip is the share of items whose predicted letter changed."""

from __future__ import annotations

import torch


def per_culture_mean(values: torch.Tensor, culture: torch.Tensor, C: int) -> torch.Tensor:
    """Mean of ``values`` [..., n] over the items of each culture: [..., C] (NaN if none)."""
    onehot = torch.zeros(C, culture.numel(), dtype=torch.float64)
    onehot[culture, torch.arange(culture.numel())] = 1
    counts = onehot.sum(1)
    return (values.double() @ onehot.T) / counts


def matrices(
    pred_full: torch.Tensor,  # int64 [n] letter index of the full model, -1 unparseable
    pred: torch.Tensor,  # int64 [S, n] under each ablated set
    culture: torch.Tensor,  # int64 [n] culture index of each item
    C: int,
    labels: torch.Tensor | None,  # int64 [n], None when hidden
) -> dict:
    """``accuracy_full`` [C], ``accuracy`` / ``delta`` / ``flip`` [S, C] (None without labels)."""
    flip = per_culture_mean((pred != pred_full).double(), culture, C)
    out = {"flip": flip, "accuracy_full": None, "accuracy": None, "delta": None}
    if labels is not None:
        full = 100 * per_culture_mean((pred_full == labels).double(), culture, C)
        acc = 100 * per_culture_mean((pred == labels).double(), culture, C)
        out.update(accuracy_full=full, accuracy=acc, delta=acc - full)
    return out


def per_culture_sum(values: torch.Tensor, culture: torch.Tensor, C: int) -> list[int]:
    """int per culture: the sum of ``values`` ``[n]`` over its items."""
    return torch.zeros(C, dtype=torch.int64).index_add_(0, culture, values.long()).tolist()


def self_cross(matrix: torch.Tensor) -> dict:
    """``self`` = mean diagonal, ``cross`` = mean off-diagonal, ``gap = self - cross`` of a
    square [C, C] matrix. For accuracy deltas a more negative self and gap mean a more
    selective method; for NLL deltas (the LM task) a more positive one."""
    C = matrix.shape[0]
    diag = torch.eye(C, dtype=torch.bool)
    # nanmean: a culture without evaluation items leaves NaN cells, not a NaN summary.
    s = matrix[diag].nanmean().item()
    c = matrix[~diag].nanmean().item() if C > 1 else float("nan")
    return {"self": nan_to_none(s), "cross": nan_to_none(c), "gap": nan_to_none(s - c)}


def nan_to_none(x):
    """JSON-ready: NaN (a culture without items) becomes None, in nested lists too."""
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return None if x != x else x
