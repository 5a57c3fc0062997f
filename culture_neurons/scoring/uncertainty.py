"""Uncertainty and controls (SPEC "Uncertainty and controls"): a paired bootstrap over the
evaluation items, summaries per resample, and p-values against the size-matched RND null.

Bootstrap. Resample b (of B) redraws, for every culture, as many of its evaluation items as it
has, uniformly with replacement among that culture's items (stratified: every culture keeps its
item count). One index draw ``index [B, n]`` serves every condition of a run: the full model,
every method's sets and every RND draw see the same resampled items (paired), so what the full
model gets right or wrong by luck cancels in a delta, and two methods compare on equal terms.
A resampled per-culture mean is a weighted sum: ``W[b, i]`` counts how often item i is in
resample b, and the mean of ``v [R, n]`` over culture c in resample b is
``(v[:, items of c] @ W[:, items of c].T) / n_c``, one matmul per culture.

Intervals are percentile intervals: the 2.5 and 97.5 percentiles of the B resampled values
(numpy's default linear interpolation), 95 % by default.

Summaries per resample (self, cross, gap, specificity) are those of
:func:`culture_neurons.scoring.metrics.summaries`.

p-value against RND (a permutation test). Each RND draw holds, for every culture s, a uniform
random set of the method's size for s, drawn independently of the other cultures' sets. Under
the null "the method picks culture s's neurons like a uniform random draw of that size", the
method's set for s and the D draws' sets for s are D + 1 exchangeable sets, independently for
every s. Every summary is a function of row sums (:class:`~culture_neurons.scoring.metrics.
RowParts`), so a null value is the summary of a *recombined* matrix whose row s comes from any
of the D + 1 sets of s: (D + 1)^C recombinations, among them the method's own. On each
resample b, the p-value is the share of recombinations at least as selective as the method
(all of them when (D + 1)^C <= PERMUTATIONS, exact; else PERMUTATIONS uniform ones, counting
the method itself once more: (1 + count) / (PERMUTATIONS + 1), never 0), averaged over the
resamples: "the share of (RND draw x bootstrap) values at least as selective as the method's",
with rows drawn from any draw. Recombining rows is what lets a few draws resolve small
p-values: the whole-draw version (a draw's own C rows only) cannot go below 1 / (D + 1), so it
would need 20 draws (20 x C more conditions) before p < 0.05 were even possible; here the floor
is max(1 / (D + 1)^C, 1 / (PERMUTATIONS + 1)) (:func:`resolution`). Two-sided (the direction
of a steering effect is not known in advance): twice the smaller one-sided p, capped at 1. A
value that is undefined (NaN) counts against the method (conservative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from culture_neurons.errors import UsageError
from culture_neurons.scoring.metrics import RowParts, from_parts

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
PERMUTATIONS = 2000  # random row recombinations per resample (p resolution 1/2001)
# Selective direction of a measure: -1 = lower is more selective (accuracy lost), +1 = higher
# (NLL gained, answers flipped, specificity), 0 = unknown in advance (two-sided).
LOWER, HIGHER, TWO_SIDED = -1, 1, 0


@dataclass
class Bootstrap:
    """Stratified resamples of the n evaluation items (see the module doc)."""

    culture: torch.Tensor  # int64 [n] culture index of each item
    C: int
    index: torch.Tensor  # int64 [B, n]: slot j of resample b holds item index[b, j], of culture[j]
    seed: int
    _weights: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def draw(cls, culture: torch.Tensor, C: int, resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0) -> Bootstrap:  # fmt: skip
        """B = ``resamples`` stratified resamples of the items of ``culture`` [n], seeded."""
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
            raise UsageError(f"resamples must be a positive int, got {resamples!r}")
        culture = torch.as_tensor(culture, dtype=torch.int64)
        order = torch.argsort(culture, stable=True)  # items grouped by culture
        count = torch.bincount(culture, minlength=C)  # [C]
        start = torch.cumsum(count, 0) - count  # [C] first position of each culture in `order`
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(resamples, culture.numel(), generator=gen, dtype=torch.float64)
        # slot j draws uniformly among the count[culture[j]] items of its own culture
        offset = (u * count[culture]).long().clamp_max(count[culture] - 1)
        index = order[start[culture] + offset]
        return cls(culture, C, index, seed)

    @property
    def resamples(self) -> int:
        return self.index.shape[0]

    @property
    def weights(self) -> torch.Tensor:
        """float64 [B, n]: how often item i is in resample b (each row sums to n)."""
        if self._weights is None:
            B, n = self.index.shape
            ones = torch.ones(B, n, dtype=torch.float64)
            self._weights = torch.zeros(B, n, dtype=torch.float64).scatter_add_(1, self.index, ones)
        return self._weights

    @property
    def items_per_culture(self) -> torch.Tensor:
        return torch.bincount(self.culture, minlength=self.C)

    def culture_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [..., n] summed over each culture's resampled items: [..., B, C]."""
        lead, n = values.shape[:-1], values.shape[-1]
        order, bounds = self._by_culture()
        v = values.reshape(-1, n).double()[:, order]  # items grouped by culture
        Wt = self.weights[:, order].T.contiguous()  # [n, B]
        sums = [v[:, a:b] @ Wt[a:b] for a, b in bounds]  # per culture [R, B]
        return torch.stack(sums, -1).reshape(*lead, self.resamples, self.C)

    def _by_culture(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Item order grouped by culture and each culture's [start, end) in it."""
        order = torch.argsort(self.culture, stable=True)
        ends = torch.cumsum(self.items_per_culture, 0).tolist()
        return order, list(zip([0, *ends[:-1]], ends, strict=True))

    def culture_means(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [..., n] averaged over each culture's resampled items: [..., B, C] (NaN
        for a culture without items)."""
        return self.culture_sums(values) / self.items_per_culture.double()


def interval(samples: torch.Tensor, confidence: float = CONFIDENCE) -> torch.Tensor:
    """Percentile interval of resampled values ``samples`` [..., B]: [..., 2] (lo, hi); NaN
    resamples are left out, NaN where all are."""
    tail = (1 - confidence) / 2
    x = samples.double().numpy()
    empty = np.isnan(x).all(axis=-1)
    lohi = np.nanquantile(np.where(empty[..., None], 0.0, x), [tail, 1 - tail], axis=-1)
    lohi[:, empty] = np.nan
    return torch.from_numpy(np.moveaxis(lohi, 0, -1).copy())


def p_value(method: RowParts, null: list[RowParts], key: str, direction: int,
            permutations: int = PERMUTATIONS, seed: int = 0) -> float | None:
    """p-value of summary ``key`` (gap, specificity) of the method against its RND draws,
    by recombining rows (see the module doc), averaged over the bootstrap resamples.

    Args:
        method: :class:`RowParts` of the method's resampled matrices (each [B, C]).
        null: the same of each of its D RND draws (on the same resamples).
        direction: LOWER (-1), HIGHER (+1) or TWO_SIDED (0).
        permutations: random recombinations per resample when (D + 1)^C is larger (all of
            them, exactly, otherwise).
        seed: of the recombinations drawn.

    Returns:
        The p-value, or None without draws or where the method's value is undefined on every
        resample.
    """
    if not null:
        return None
    if direction == TWO_SIDED:
        one = [p_value(method, null, key, d, permutations, seed) for d in (LOWER, HIGHER)]
        return None if None in one else min(1.0, 2 * min(one))
    if direction not in (LOWER, HIGHER):
        raise UsageError(f"direction must be -1, 0 or 1, got {direction!r}")
    B, C = method.diag.shape
    n_diag, n_off = method.n_diag.unsqueeze(-1), method.n_off.unsqueeze(-1)  # [B, 1]
    observed = from_parts(method.diag.sum(-1, keepdim=True), method.off.sum(-1, keepdim=True),
                          n_diag, n_off, C)[key]  # [B, 1]  # fmt: skip
    if torch.isnan(observed).all():
        return None
    sets = len(null) + 1  # the method's own set is one of each row's exchangeable sets
    exact = sets**C <= permutations
    choice = _recombinations(C, sets, permutations, seed, exact)  # [C * sets, R] one-hot
    parts = [method, *null]
    diag = torch.stack([p.diag for p in parts], -1).reshape(B, C * sets).double()
    off = torch.stack([p.off for p in parts], -1).reshape(B, C * sets).double()
    recombined = from_parts(diag @ choice, off @ choice, n_diag, n_off, C)[key]  # [B, R]
    at_least = (recombined <= observed) if direction == LOWER else (recombined >= observed)
    at_least |= torch.isnan(recombined) | torch.isnan(observed)  # undefined: against it
    R = choice.shape[1]
    per_resample = at_least.double().mean(1) if exact else (1 + at_least.double().sum(1)) / (R + 1)
    return per_resample.mean().item()


def _recombinations(C: int, sets: int, permutations: int, seed: int,
                    exact: bool) -> torch.Tensor:  # fmt: skip
    """float64 [C * sets, R]: column r picks one set per row (entry s * sets + j = 1 when row s
    takes set j): every combination when ``exact``, else ``permutations`` uniform ones."""
    if exact:
        pick = torch.cartesian_prod(*[torch.arange(sets)] * C).reshape(-1, C)  # [sets^C, C]
    else:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, sets, (permutations, C), generator=gen)
    flat = pick + torch.arange(C) * sets  # [R, C] flat index s * sets + j
    out = torch.zeros(C * sets, pick.shape[0], dtype=torch.float64)
    out.scatter_(0, flat.T, 1.0)
    return out


def resolution(draws: int, C: int, permutations: int = PERMUTATIONS) -> float:
    """The smallest p-value :func:`p_value` can give with ``draws`` RND draws of C rows."""
    combinations = (draws + 1) ** C
    return 1.0 / combinations if combinations <= permutations else 1.0 / (permutations + 1)
