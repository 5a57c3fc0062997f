"""How stable a selection is: the overlap of two sets and what random sets would give.

Two selections of one method (on two halves of the identification items, or in two runs of
one model) give, per culture, sets A and B of (layer, neuron) pairs. Their overlap is the
Jaccard index ``J = |A & B| / |A | B|`` (1 = the same neurons, 0 = disjoint; two empty sets:
undefined, NaN).

The reference is two *independent uniform* sets of the same sizes ``a = |A|``, ``b = |B|``
from the pool the selection ranks (every one of the ``L * N`` neurons, or each layer's ``N``
when it ranks per layer). Their intersection ``X`` is then hypergeometric,
``P(X = k) = C(a, k) C(pool - a, b - k) / C(pool, b)`` with ``E[X] = a b / pool``, and since
``|A | B| = a + b - X``, the expected Jaccard is computed exactly as

    E[J] = sum_k P(X = k) * k / (a + b - k)

(per layer: ``X`` is the sum of independent per-layer hypergeometrics, whose distribution is
the convolution of theirs, and ``J = X / (a + b - X)`` with the totals). This is not
``E[X] / E[|A | B|]``; the simulation in ``tests/selection/test_stability.py`` checks it.
A selection far above ``E[J]`` picks the same neurons from different items: a property of the
model, not of the items it happened to see.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks, set_jaccard


def intersection_pmf(pool: int, a: int, b: int) -> np.ndarray:
    """``P(X = k)`` for k = 0..min(a, b): the intersection of independent uniform sets of sizes
    ``a`` and ``b`` from ``pool`` items (hypergeometric), float64 ``[min(a, b) + 1]``."""
    if not (0 <= a <= pool and 0 <= b <= pool):
        raise UsageError(f"set sizes {a} and {b} must lie in [0, {pool}] (the pool)")
    k = torch.arange(min(a, b) + 1, dtype=torch.float64)

    def log_choose(n, r):  # log C(n, r), -inf where r is outside [0, n]
        n = torch.as_tensor(n, dtype=torch.float64)
        ok = (r >= 0) & (r <= n)
        r = r.clamp(min=0)
        out = torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma((n - r).clamp(min=0) + 1)
        return torch.where(ok, out, torch.tensor(-math.inf, dtype=torch.float64))

    log_p = log_choose(a, k) + log_choose(pool - a, b - k) - log_choose(pool, torch.tensor(b))
    p = torch.exp(log_p).numpy()
    return p / p.sum()  # exact up to rounding; the sum is 1 to ~1e-12


def expected_jaccard(a: int, b: int, pool: int) -> float:
    """E[J] of independent uniform sets of sizes ``a``, ``b`` from ``pool`` (module doc)."""
    return _expected(intersection_pmf(pool, a, b), a, b)


def expected_jaccard_per_layer(a: list[int], b: list[int], pool: int) -> float:
    """E[J] where each layer l draws ``a[l]`` and ``b[l]`` of its ``pool`` neurons
    independently (selection ranked per layer); J is of the whole sets."""
    if len(a) != len(b):
        raise UsageError(f"per-layer sizes of {len(a)} and {len(b)} layers")
    pmf = np.ones(1)
    for al, bl in zip(a, b, strict=True):
        pmf = np.convolve(pmf, intersection_pmf(pool, int(al), int(bl)))
    return _expected(pmf, int(sum(a)), int(sum(b)))


def _expected(pmf: np.ndarray, a: int, b: int) -> float:
    if a + b == 0:
        return float("nan")
    k = np.arange(len(pmf), dtype=np.float64)
    return float((pmf * k / (a + b - k)).sum())


def overlap(first: Masks, second: Masks, per_layer: bool = False,
            names: list[str] | None = None) -> dict:  # fmt: skip
    """Per set name (``names``, default the sets both have, in ``first``'s order): the Jaccard
    of the two selections' sets and its expectation for random sets of their sizes (pool:
    ``L * N``, or ``N`` per layer with ``per_layer``). Returns ``{"names", "jaccard",
    "expected", "sizes": [[a, b]], "mean", "expected_mean", "pool"}`` (means over the names
    whose J is defined; JSON-ready, NaN as None).

    Raises:
        StatsMismatchError: the masks belong to different models.
    """
    second.require_model(first.fingerprint, "the second selection")
    names = [n for n in first.names if n in second.names] if names is None else names
    L, N = first.num_layers, first.num_neurons
    js, es, sizes = [], [], []
    counts_a, counts_b = first.layer_counts(), second.layer_counts()
    for name in names:
        i, j = first.set_index(name), second.set_index(name)
        a, b = first.flat_of(i), second.flat_of(j)
        js.append(set_jaccard(a, b))
        if per_layer:
            es.append(expected_jaccard_per_layer(counts_a[i].tolist(), counts_b[j].tolist(), N))
        else:
            es.append(expected_jaccard(a.numel(), b.numel(), L * N))
        sizes.append([a.numel(), b.numel()])
    defined = [k for k, v in enumerate(js) if not math.isnan(v)]
    return {
        "names": list(names),
        "jaccard": [_json(v) for v in js],
        "expected": [_json(v) for v in es],
        "sizes": sizes,
        "mean": _json(float(np.mean([js[k] for k in defined]))) if defined else None,
        "expected_mean": _json(float(np.mean([es[k] for k in defined]))) if defined else None,
        "pool": f"{N} per layer" if per_layer else L * N,
    }


def _json(x: float) -> float | None:
    return None if math.isnan(x) else x
