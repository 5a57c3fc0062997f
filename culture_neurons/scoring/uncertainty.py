"""Uncertainty (SPEC "Uncertainty and controls"): a paired bootstrap over the evaluation items,
summaries per resample, their intervals and the flags that say where those are unreliable.

Bootstrap. Resample b (of B) redraws, for every culture, as many of its evaluation items as it
has, uniformly with replacement among that culture's items (stratified: every culture keeps its
item count). One index draw ``index [B, n]`` serves every condition of a run: the full model,
every method's sets and every RND draw see the same resampled items (paired), so what the full
model gets right or wrong by luck cancels in a delta, and two methods compare on equal terms.
A resampled per-culture mean is a weighted sum: ``W[b, i]`` counts how often item i is in
resample b, and the mean of ``v [R, n]`` over culture c in resample b is
``(v[:, items of c] @ W[:, items of c].T) / n_c``, one matmul per culture.

Intervals are percentile intervals of the B resampled values (numpy's default linear
interpolation), 95 % by default: the 2.5 and 97.5 percentiles, or, given the number of items
a value rests on, the expanded percentile interval (:func:`expanded_tail`), which the pipeline
uses with the smallest culture's item count.

Summaries per resample (self, cross, gap, specificity) are those of
:func:`culture_neurons.scoring.metrics.summaries`.

The bootstrap serves intervals only: tests against random sets are computed once on the
observed per-item changes (:mod:`culture_neurons.scoring.random_control`); averaging a
per-resample p over resamples held no level (0-1 % rejections at a nominal 5 %, issue #22).

Small n. Percentile intervals of per-culture accuracies covered 0.78-0.83 at 5 items per
culture (a binary mean has few distinct resampled values: 56-62 % of such cells had zero-width
intervals like [0, 0]) and 0.92-0.95 from 20 items on (issue #22; the gap's coverage at 20 is a
test). So a run with fewer than MIN_ITEMS evaluation items in some culture is flagged
(:func:`interval_flags`, the report says its intervals are unreliable), and every zero-width
interval and every summary's share of undefined resamples is counted, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from culture_neurons.errors import UsageError
from culture_neurons.scoring import sampled

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
MIN_ITEMS = 20  # evaluation items per culture below which intervals are flagged unreliable


@dataclass
class Bootstrap:
    """Stratified resamples of the n evaluation items (see the module doc)."""

    culture: torch.Tensor  # int64 [n] culture index of each item
    C: int
    index: torch.Tensor  # int64 [B, n]: slot j of resample b holds item index[b, j], of culture[j]
    seed: int
    complete: torch.Tensor | None = None  # bool [n] where some items miss some sets (draw)
    _weights: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def draw(cls, culture: torch.Tensor, C: int, resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0, complete: torch.Tensor | None = None) -> Bootstrap:  # fmt: skip
        """B = ``resamples`` stratified resamples of the items of ``culture`` [n], seeded. With
        ``complete`` (bool [n]: the items computed under every set, ``--matrix sample``'s
        share), each culture's complete items and its others are resampled apart, each
        keeping its count (the off-diagonal cells average over the share alone)."""
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
            raise UsageError(f"resamples must be a positive int, got {resamples!r}")
        culture = torch.as_tensor(culture, dtype=torch.int64)
        partial = complete is not None and not bool(complete.all())
        group = sampled.strata(complete, culture) if partial else culture  # the strata
        order = torch.argsort(group, stable=True)  # items grouped by stratum
        count = torch.bincount(group)  # per stratum
        start = torch.cumsum(count, 0) - count  # first position of each stratum in `order`
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(resamples, culture.numel(), generator=gen, dtype=torch.float64)
        # slot j draws uniformly among the count[group[j]] items of its own stratum
        offset = (u * count[group]).long().clamp_max(count[group] - 1)
        index = order[start[group] + offset]
        return cls(culture, C, index, seed, complete if partial else None)

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

    @property
    def cell_items(self) -> torch.Tensor:
        """int64 [C]: the fewest items a cell of each culture averages over (its complete
        items where some miss some sets)."""
        if self.complete is None:
            return self.items_per_culture
        return torch.bincount(self.culture[self.complete], minlength=self.C)

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
        for a culture without items); NaN values (not computed) are left out."""
        missing = torch.isnan(values)
        if not bool(missing.any()):
            return self.culture_sums(values) / self.items_per_culture.double()
        return self.culture_sums(values.nan_to_num(0.0)) / self.culture_sums((~missing).double())


def interval(samples: torch.Tensor, confidence: float = CONFIDENCE,
             items: int | None = None) -> torch.Tensor:  # fmt: skip
    """Percentile interval of resampled values ``samples`` [..., B]: [..., 2] (lo, hi); NaN
    resamples are left out, NaN where all are. With ``items`` (the smallest number of items a
    value averages over), the expanded percentile interval (see :func:`tail`)."""
    tail = expanded_tail(confidence, items)
    x = samples.double().numpy()
    empty = np.isnan(x).all(axis=-1)
    lohi = np.nanquantile(np.where(empty[..., None], 0.0, x), [tail, 1 - tail], axis=-1)
    lohi[:, empty] = np.nan
    return torch.from_numpy(np.moveaxis(lohi, 0, -1).copy())


def t_quantile(q: float, df: float) -> float:
    """Student t quantile by the Cornish-Fisher expansion around the normal one (at q = 0.975
    within 0.03 of the exact value for df >= 3, 0.002 for df >= 10; no scipy dependency)."""
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def expanded_tail(confidence: float = CONFIDENCE, items: int | None = None) -> float:
    """Each tail's share of the percentile interval. Plain: (1 - confidence) / 2. Expanded
    (Hesterberg 2015, "What teachers should know about the bootstrap", section 4.2) for a mean
    of ``items`` items: ``Phi(-sqrt(n / (n - 1)) t_{n-1})``, which corrects the bootstrap's
    too-narrow spread ((n - 1) / n of the variance) and the normal for t: 0.0159 instead of
    0.025 at 20 items. The gap's coverage at 20 items per culture rose from 0.92 (plain, C = 3)
    into [0.93, 0.97] (a test)."""
    plain = (1 - confidence) / 2
    if items is None or items < 2:
        return plain
    z = math.sqrt(items / (items - 1)) * t_quantile(1 - plain, items - 1)
    return float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(-z, dtype=torch.float64)))


def interval_flags(items_per_culture: list[int], cis: dict, undefined: dict) -> dict:
    """The ``intervals`` field of an eval JSON: whether every culture has MIN_ITEMS evaluation
    items (below, intervals are unreliable), how many cell intervals of each matrix ``cis``
    ``{key: [S][C] [lo, hi]}`` have zero width, and each summary's share of undefined
    resamples ``undefined`` ``{key: share}``."""
    zero = {k: sum(1 for row in v for c in row if c and c[0] is not None and c[0] == c[1])
            for k, v in cis.items() if v is not None}  # fmt: skip
    smallest = min(items_per_culture) if items_per_culture else 0
    return {"method": "expanded percentile", "min_items_per_culture": MIN_ITEMS,
            "smallest_culture": smallest, "reliable": smallest >= MIN_ITEMS,
            "zero_width_cells": zero, "undefined_share": undefined}  # fmt: skip
