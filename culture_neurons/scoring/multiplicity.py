"""Many tests in one run (SPEC "Uncertainty and controls"): the primary measure's p-values are
Holm-adjusted across the run's methods (family-wise error), and matrix cells are tested one by
one, each with a test valid at small n, under Benjamini-Hochberg across the matrix (false
discovery rate).

Cell test (``cell_p``): the paired changes of one cell's items (set s, culture c': each item's
score under s minus under the full model) are symmetric around 0 under the null "the set does
not change this culture's scores" (ablating or not is exchangeable for every item). The sign-flip
test of their sum is exact under it: when every nonzero change has the same size (accuracy:
+-100 points, an exact McNemar / sign test) it is the two-sided binomial test on the signs,
computed exactly; otherwise (NLL) SIGN_FLIPS random sign assignments, the observed counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SIGN_FLIPS = 4000
TIE_RTOL = 1e-9


def holm(p) -> list:
    """Holm step-down adjusted p-values of ``p`` (None / NaN stay None), in the input order."""
    vals = [(i, float(x)) for i, x in enumerate(p) if x is not None and not math.isnan(x)]
    out: list = [None] * len(p)
    m, running = len(vals), 0.0
    for rank, (i, x) in enumerate(sorted(vals, key=lambda t: t[1])):
        running = max(running, min(1.0, (m - rank) * x))
        out[i] = running
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q) of an array of p-values of any shape; NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    flat = p.ravel()
    ok = ~np.isnan(flat)
    q = np.full_like(flat, np.nan)
    x = flat[ok]
    if x.size:
        order = np.argsort(x)
        ranked = x[order] * x.size / np.arange(1, x.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        out = np.empty_like(x)
        out[order] = np.minimum(ranked, 1.0)
        q[ok] = out
    return q.reshape(p.shape)


def cell_p(change: torch.Tensor, culture: torch.Tensor, C: int, seed: int = 0) -> np.ndarray:
    """Two-sided p-values ``[S, C]`` of every cell of per-item changes ``change [S, n]`` (see the
    module doc), each on the items computed under its set (NaN: not computed); NaN for a cell
    without items."""
    x_all = change.double().numpy()
    cult = culture.numpy()
    rng = np.random.default_rng(seed)
    out = np.full((x_all.shape[0], C), np.nan)
    for c in range(C):
        x = x_all[:, cult == c]
        for s in range(x.shape[0]):
            row = x[s][~np.isnan(x[s])]  # the items computed under set s (--matrix sample)
            if row.size:
                out[s, c] = _sign_flip(row, rng)
    return out


def _sign_flip(x: np.ndarray, rng) -> float:
    scale = np.abs(x).max() if x.size else 0.0
    nonzero = x[np.abs(x) > TIE_RTOL * scale] if scale > 0 else x[:0]
    k = nonzero.size
    if k == 0:
        return 1.0
    if np.allclose(np.abs(nonzero), np.abs(nonzero[0]), rtol=1e-9, atol=0):
        ups = int((nonzero > 0).sum())
        return _binomial_two_sided(ups, k)
    observed = abs(nonzero.sum())
    signs = rng.choice((-1.0, 1.0), size=(SIGN_FLIPS, k))
    null = np.abs(signs @ nonzero)
    extreme = (null >= observed - TIE_RTOL * np.abs(nonzero).sum()).sum()
    return (1 + int(extreme)) / (SIGN_FLIPS + 1)


def _binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided sign test: twice the smaller tail of Binomial(n, 1/2), capped at 1."""
    pmf = np.array([math.comb(n, i) for i in range(n + 1)], dtype=float) / 2.0**n
    lower, upper = pmf[: k + 1].sum(), pmf[k:].sum()
    return float(min(1.0, 2 * min(lower, upper)))
