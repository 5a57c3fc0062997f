"""What a planted experiment planted (:class:`Truth`) and how selected sets score against it
(:class:`Score`, :func:`score`, :func:`select_matched`); :mod:`.planted` builds the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks
from culture_neurons.selection.methods import select
from culture_neurons.stats import Stats


@dataclass
class Truth:
    """What was planted, as flat neuron indices ``l * N + n`` (int64, increasing).

    ``planted[c]``: culture c's neurons [per_culture]; ``always_on``: [always_on];
    ``pairs``: [pairs] with ``pair_cultures`` [pairs, 2], the two cultures each one fires for.
    """

    planted: list[torch.Tensor]
    always_on: torch.Tensor
    pairs: torch.Tensor
    pair_cultures: torch.Tensor
    num_layers: int
    num_neurons: int

    def triples(self) -> torch.Tensor:
        """The planted truth as (layer, neuron, culture) rows, int64 [C * per_culture, 3]."""
        rows = [
            torch.stack([f // self.num_neurons, f % self.num_neurons, torch.full_like(f, c)], 1)
            for c, f in enumerate(self.planted)
        ]
        return torch.cat(rows)

    def probabilities(self, stats: Stats, flat: torch.Tensor | None = None) -> torch.Tensor:
        """P of neurons on every culture: float64 [C, k, C'], entry [c, j, c'] = P[c'] of
        culture c's j-th planted neuron; or, given ``flat`` [n], float64 [n, C']."""
        C = stats.shape[0]
        P = stats.P.reshape(C, -1)  # [C', L * N]
        if flat is not None:
            return P[:, flat].T
        return torch.stack([P[:, f].T for f in self.planted])

    def dense(self) -> torch.Tensor:
        """bool [C, L, N]: True where neuron (l, n) was planted for culture c."""
        C, L, N = len(self.planted), self.num_layers, self.num_neurons
        out = torch.zeros(C, L * N, dtype=torch.bool)
        for c, f in enumerate(self.planted):
            out[c, f] = True
        return out.view(C, L, N)


# -- judging selectors against the truth --------------------------------------------------------
@dataclass
class Score:
    """Selected sets against the truth, micro-summed over cultures (and over draws or seeds).

    ``tp``: selected neurons planted for the culture they were selected for; ``selected`` and
    ``planted``: set sizes summed; ``always_on`` / ``pairs``: selected distractors.
    """

    tp: int = 0
    selected: int = 0
    planted: int = 0
    always_on: int = 0
    pairs: int = 0

    @property
    def precision(self) -> float:
        """tp / selected; NaN when nothing was selected (undefined, not 0)."""
        return self.tp / self.selected if self.selected else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.planted if self.planted else float("nan")

    def __add__(self, other: Score) -> Score:
        return Score(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(score: Score) -> tuple[int, ...]:
    return (score.tp, score.selected, score.planted, score.always_on, score.pairs)


def score(masks: Masks | list[Masks], truth: Truth) -> Score:
    """Micro-averaged hits of ``masks`` (set c = culture c, as selectors return them) against
    ``truth``; a list (``rnd`` draws) sums its members."""
    if isinstance(masks, list):
        return sum((score(m, truth) for m in masks), Score())
    if len(masks) != len(truth.planted):
        raise UsageError(
            f"masks have {len(masks)} sets but {len(truth.planted)} cultures were planted"
        )
    out = Score()
    for c, planted in enumerate(truth.planted):
        chosen = masks.flat_of(c)
        out += Score(
            tp=int(torch.isin(chosen, planted).sum()),
            selected=chosen.numel(),
            planted=planted.numel(),
            always_on=int(torch.isin(chosen, truth.always_on).sum()),
            pairs=int(torch.isin(chosen, truth.pairs).sum()),
        )
    return out


def select_matched(
    stats: Stats, truth: Truth, method: str, seed: int = 0, draws: int = 5, **options
) -> Masks | list[Masks]:
    """Run selector ``method`` so that its sets are as large as the planted ones.

    - ``cas lap mad``: ``ratio = k / (L * N)`` with k planted neurons per culture, so that the
      selectors' ``round(L * N * ratio)`` is exactly k (checked);
    - ``lape``: ``top_rate = C * k / (L * N)``: it keeps as many neurons as were planted in all.
      Its sets are then sized by its own bar (``bar_ratio``, default 0.95) and may overlap, so
      precision and recall are both needed to judge it;
    - ``rnd``: ``draws`` seeded uniform draws with the sizes of the ``cas`` sets (a list).

    ``options`` go to the selector (e.g. ``contrast="max"`` for ``mad``).
    """
    sizes = {f.numel() for f in truth.planted}
    if len(sizes) != 1:
        raise UsageError(f"size matching needs equal planted counts per culture, got {sizes}")
    k, (_, L, N) = sizes.pop(), stats.shape
    ratio = k / (L * N)
    if method == "lape":
        return select(stats, "lape", ratio=len(truth.planted) * ratio, **options)
    if method == "rnd":
        like = select(stats, "cas", ratio=ratio)
        return select(stats, "rnd", like=like, seed=seed, draws=draws, **options)
    masks = select(stats, method, ratio=ratio, **options)
    count = masks.options.get("count")
    if count != k:  # would silently change what precision and recall mean
        raise UsageError(f"{method}: ratio {ratio} gave {count} neurons per culture, not {k}")
    return masks
