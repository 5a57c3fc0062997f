"""Neuron selectors (SPEC "Definitions"): per culture, the neurons whose ablation should hurt it.

Symbols: C cultures, L layers, N neurons per layer; ``P = K / T`` and ``M = S / T`` are
float64 [C, L, N] (see :mod:`culture_neurons.stats`). Each selector returns a
:class:`~culture_neurons.masks.Masks` with one set per culture (names = ``stats.cultures``).

Sizes. "Top r" means ``k = round(L * N * r)`` neurons per culture ranked across all layers
(Python ``round``, the rounding LAPE uses), or with ``per_layer=True`` ``k = round(N * r)`` in
every layer. A culture with fewer candidates than k gets all of them: sets are never padded
with non-candidates (only ``cas`` has candidates; ``lape`` sizes are its own, see there).

Ranking is exact and deterministic: scores are float64, ties go to the smaller flat index
``l * N + n`` (i.e. (layer, neuron) order), via :mod:`culture_neurons.topk` (``backend=``
"cpp" / "torch" / None = the built one; both give identical sets).

Methods (keys ``cas lap lape mad rnd``):

- ``cas`` (ConAct): ``c1 = argmax_c P[c]`` (ties: lowest culture index), margin
  ``P[c1] - max_{c != c1} P[c]`` (0 when the top value is shared); the neuron is a candidate of
  c1 only, ranked by its margin. ``normalize=True`` ranks ``P / sum_c P`` instead (0 where
  the sum is 0). Each neuron is thus in at most one set, that of its argmax culture.
- ``lap``: ranks ``P[c]``.
- ``lape`` (Tang et al. 2024): entropy of ``P`` normalised over cultures, thresholds by exact
  order statistics of all C*L*N values of P; see :func:`lape`.
- ``mad``: ranks ``M[c] - mean_{c' != c} M[c']`` (``contrast="max"``: ``- max_{c' != c}``).
- ``rnd``: uniform random sets of the same sizes as given masks (per layer if asked), seeded.

A culture with ``T = 0`` (no counted tokens, P undefined) is an error that names it.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from culture_neurons.errors import DataError, UsageError
from culture_neurons.masks import Masks
from culture_neurons.selection.topk import kth_value, top2, topk_groups, topk_rows
from culture_neurons.stats import Stats

METHODS = ("cas", "lap", "lape", "mad", "rnd")
SELECTORS = METHODS[:4]  # the methods a user picks: rnd runs as every one's size-matched control
DEFAULT_RATIO = 0.005  # SPEC: top 0.5 % of the L * N neurons per culture
CONTRASTS = ("mean", "max")


def select(
    stats: Stats,
    method: str,
    ratio: float | None = None,
    per_layer: bool = False,
    **options,
) -> Masks | list[Masks]:
    """Run selector ``method`` (one of ``cas lap lape mad rnd``) on ``stats``.

    Args:
        ratio: share r of neurons per culture (``cas lap mad rnd``); for ``lape`` it is
            ``top_rate`` (the share of all L*N neurons kept before assignment). ``None``: the
            method's default (0.005; ``lape``: 0.01 as Tang et al.).
        per_layer: rank within each layer (top r of each layer's N) instead of across layers.
        **options: the method's own keywords (e.g. ``normalize``, ``contrast``, ``filter_rate``,
            ``like``, ``seed``, ``draws``, ``backend``); see each function.

    Returns:
        :class:`Masks` (``rnd`` with ``draws=n``: a list of n of them).
    """
    if method not in _SELECTORS:
        raise UsageError(f"unknown selector {method!r}; choose one of {', '.join(METHODS)}")
    fn = _SELECTORS[method]
    accepted = set(inspect.signature(fn).parameters) - {"stats", "per_layer"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(
            f"selector {method!r} takes no option {', '.join(unknown)}; it accepts "
            f"{', '.join(sorted(accepted))}"
        )
    if ratio is not None:
        key = "top_rate" if method == "lape" else "ratio"
        if key in options:
            raise UsageError(f"selector {method!r}: give either ratio or {key}, not both")
        options[key] = ratio
    return fn(stats, per_layer=per_layer, **options)


# -- the selectors ------------------------------------------------------------------------------
def cas(
    stats: Stats,
    ratio: float = DEFAULT_RATIO,
    per_layer: bool = False,
    normalize: bool = False,
    backend: str | None = None,
) -> Masks:
    """ConAct / CAS: each neuron is a candidate of its argmax culture only, scored by its margin.

    ``c1 = argmax_c P[c]`` (ties: the lowest culture index, then margin 0),
    ``margin = P[c1] - second largest P`` over cultures; culture c ranks its candidates by
    margin (ties: (layer, neuron) order) and takes the top ``k``. Needs at least 2 cultures.

    A culture with fewer than k candidates gets all of them and no more: a neuron that another
    culture owns is never lent to fill the quota (its set would stop being culture-specific),
    so sizes can differ between cultures; ``rnd(like=...)`` matches them. A shared maximum goes
    to the lowest culture index with margin 0, so such neurons (and never-firing ones, P = 0
    everywhere) rank last in that culture and are only taken when it runs out of positive
    margins.

    Returns:
        Masks with one set per culture; the sets are disjoint.
    """
    _require_cultures(stats, "cas", 2)
    P = _probabilities(stats, "cas")
    if normalize:
        P = _normalised(P)
    C, L, N = P.shape
    first, c1, second = top2(P.view(C, L * N), backend)
    # Candidates of culture c: the neurons whose argmax is c (group c, or c * L + l per layer).
    groups = c1 * L + torch.arange(L * N) // N if per_layer else c1
    size = N if per_layer else L * N
    indptr, index = topk_groups(first - second, groups, C * L if per_layer else C,
                                _count(size, ratio), backend)  # fmt: skip
    per_culture = indptr[L::L] - indptr[0:-1:L] if per_layer else indptr[1:] - indptr[:-1]
    sets = list(torch.split(index, per_culture.tolist()))
    options = {"ratio": ratio, "per_layer": per_layer, "normalize": normalize,
               "count": _count(size, ratio)}  # fmt: skip
    return Masks.from_sets(stats.cultures, sets, stats.fingerprint, "cas", options)


def lap(
    stats: Stats, ratio: float = DEFAULT_RATIO, per_layer: bool = False, backend: str | None = None
) -> Masks:
    """LAP: culture c's top ``k`` by its activation probability ``P[c]`` alone (no contrast)."""
    P = _probabilities(stats, "lap")
    options = {"ratio": ratio, "per_layer": per_layer}
    return _rank(stats, "lap", P, ratio, per_layer, backend, options)


def mad(
    stats: Stats,
    ratio: float = DEFAULT_RATIO,
    per_layer: bool = False,
    contrast: str = "mean",
    backend: str | None = None,
) -> Masks:
    """MAD: culture c's top ``k`` by ``M[c] - mean_{c' != c} M[c']`` (``contrast="max"``:
    minus the largest other M). Every neuron is ranked for every culture, so sets may overlap.
    Needs at least 2 cultures."""
    if contrast not in CONTRASTS:
        raise UsageError(f"contrast={contrast!r} is not one of {', '.join(CONTRASTS)}")
    _require_cultures(stats, "mad", 2)
    M = _per_token(stats, stats.S, "mad")
    C, L, N = M.shape
    if contrast == "mean":
        others = (M.sum(0, keepdim=True) - M).div_(C - 1)
    else:
        first, c1, second = top2(M.view(C, L * N), backend)
        is_top = torch.arange(C).view(C, 1) == c1.unsqueeze(0)
        others = torch.where(is_top, second, first).view(C, L, N)
    scores = torch.sub(M, others, out=others)  # in place: one [C, L, N] buffer fewer
    options = {"ratio": ratio, "per_layer": per_layer, "contrast": contrast}
    return _rank(stats, "mad", scores, ratio, per_layer, backend, options)


def lape(
    stats: Stats,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    bar_ratio: float = 0.95,
    per_layer: bool = False,
    backend: str | None = None,
) -> Masks:
    """LAPE (Tang et al. 2024, "Language-Specific Neurons"), as in their released ``identify.py``.

    1. ``Pn = P / sum_c P`` (0 where the sum is 0), ``H = -sum_c Pn log Pn`` with 0 log 0 = 0.
    2. ``filter = kth_value(P, round(C*L*N * filter_rate))`` over all C*L*N values of P (an exact
       order statistic, as their ``flattened_probs.kthvalue``, not an interpolated quantile);
       a neuron survives if some culture's P is strictly above it.
    3. Keep the ``round(L*N * top_rate)`` lowest-entropy survivors (``per_layer``:
       ``round(N * top_rate)`` in each layer); fewer if fewer survive. Ties: (layer, neuron)
       order (their ``torch.topk`` leaves ties unspecified).
    4. ``bar = kth_value(P, round(C*L*N * bar_ratio))``; a kept neuron belongs to every culture
       whose P is strictly above the bar (so to several, or, if ``bar_ratio > filter_rate``,
       possibly none).

    Differences from their script, on purpose: dropped neurons are never kept to fill the
    quota (theirs ranks them at entropy +inf, so they can fill it, but their bar usually
    excludes them anyway), and every culture gets a set, possibly empty (theirs drops empty
    languages from the list). Ranks below 1 are clamped to 1.

    Returns:
        Masks whose ``options`` also record ``filter_value``, ``bar_value`` and ``kept``.
    """
    for name, rate in (("filter_rate", filter_rate), ("bar_ratio", bar_ratio)):
        _check_ratio(rate, name)
    P = _probabilities(stats, "lape")
    C, L, N = P.shape
    filter_value = kth_value(P, _rank_of(P.numel(), filter_rate), backend=backend)
    bar_value = (
        filter_value
        if bar_ratio == filter_rate
        else kth_value(P, _rank_of(P.numel(), bar_ratio), backend=backend)
    )
    survivors = torch.nonzero(P.view(C, L * N).amax(0) > filter_value).squeeze(1)  # flat [J]

    # Entropy of the survivors only (the others are never ranked): usually a small share of
    # the L*N neurons, so this skips most of the log work.
    Pn = _normalised(P.view(C, L * N)[:, survivors])  # [C, J]
    H = -(Pn * torch.where(Pn > 0, Pn.log(), 0.0)).sum(0)  # [J]
    lowest_entropy = torch.full((L * N,), torch.nan, dtype=torch.float64)  # NaN: dropped
    lowest_entropy[survivors] = -H
    kept = _top_flat(lowest_entropy.view(1, L, N), top_rate, per_layer, backend)[0]

    # Assign kept neurons to every culture above the bar.
    above = P.view(C, L * N)[:, kept] > bar_value  # [C, n_kept]
    sets = [kept[above[c]] for c in range(C)]
    options = {
        "top_rate": top_rate, "filter_rate": filter_rate, "bar_ratio": bar_ratio,
        "per_layer": per_layer, "filter_value": filter_value, "bar_value": bar_value,
        "kept": int(kept.numel()),
    }  # fmt: skip
    return Masks.from_sets(stats.cultures, sets, stats.fingerprint, "lape", options)


def rnd(
    stats: Stats,
    like: Masks | None = None,
    ratio: float | None = None,
    per_layer: bool = False,
    seed: int = 0,
    draws: int | None = None,
    backend: str | None = None,
) -> Masks | list[Masks]:
    """Random control: uniform sets of the same sizes as ``like`` (the selector compared with).

    Set s of every draw has ``like.sizes()[s]`` neurons drawn uniformly without replacement from
    all L*N; with ``per_layer=True`` it matches ``like.layer_counts()[s, l]`` in every layer.
    Without ``like``: ``round(L*N * ratio)`` per culture (per layer ``round(N * ratio)``;
    ``ratio=None``: 0.005); giving both ``like`` and ``ratio`` is an error.
    Draws come from one ``torch.Generator`` seeded with ``seed``, in order, so draw 0 of
    ``draws=5`` equals ``draws=None`` with the same seed. P is not read: T = 0 is allowed.
    ``backend`` is unused (nothing is ranked); it is accepted so that every method takes it.

    Returns:
        Masks (``draws=None``) or a list of ``draws`` Masks; ``options`` record seed and draw.
    """
    L, N = stats.fingerprint.num_layers, stats.fingerprint.num_neurons
    if like is not None and ratio is not None:
        raise UsageError("rnd: give like= (match those sizes) or ratio=, not both")
    ratio = DEFAULT_RATIO if ratio is None else ratio
    if like is not None:
        like.require_model(stats.fingerprint, f"masks {like.method!r} given as like=")
        names = list(like.names)
        counts = like.layer_counts() if per_layer else like.sizes().view(-1, 1)
    else:
        names = list(stats.cultures)
        per_set = _count(N if per_layer else L * N, ratio)
        counts = torch.full((len(names), L if per_layer else 1), per_set, dtype=torch.int64)
    if draws is not None and (isinstance(draws, bool) or not isinstance(draws, int) or draws < 1):
        raise UsageError(f"draws must be a positive int or None, got {draws!r}")

    gen = torch.Generator().manual_seed(seed)
    base = {"per_layer": per_layer, "seed": seed}
    base.update({"like": like.method} if like is not None else {"ratio": ratio})
    out = []
    for d in range(draws or 1):
        sets = [_draw(counts[s], L, N, per_layer, gen) for s in range(len(names))]
        out.append(Masks.from_sets(names, sets, stats.fingerprint, "rnd", {**base, "draw": d}))
    return out if draws is not None else out[0]


_SELECTORS = {"cas": cas, "lap": lap, "lape": lape, "mad": mad, "rnd": rnd}


# -- ranking ------------------------------------------------------------------------------------
def _rank(
    stats: Stats,
    method: str,
    scores: torch.Tensor,
    ratio: float,
    per_layer: bool,
    backend: str | None,
    options: dict,
) -> Masks:
    """Masks of the top k of ``scores`` [C, L, N] per culture (NaN = not a candidate)."""
    sets = _top_flat(scores, ratio, per_layer, backend)
    options["count"] = _count(scores.shape[2] if per_layer else scores[0].numel(), ratio)
    return Masks.from_sets(stats.cultures, sets, stats.fingerprint, method, options)


def _top_flat(
    scores: torch.Tensor, ratio: float, per_layer: bool, backend: str | None
) -> list[torch.Tensor]:
    """Per row c of ``scores`` [R, L, N]: flat indices ``l * N + n`` of its top k (unsorted
    by index), k = round(L*N * ratio), or round(N * ratio) per layer."""
    R, L, N = scores.shape
    if not per_layer:
        indptr, index = topk_rows(scores.reshape(R, L * N), _count(L * N, ratio), backend)
        return list(torch.split(index, (indptr[1:] - indptr[:-1]).tolist()))
    indptr, index = topk_rows(scores.reshape(R * L, N), _count(N, ratio), backend)
    layer = torch.arange(R * L).remainder(L)
    flat = index + _repeat(layer * N, indptr[1:] - indptr[:-1])
    per_row = indptr[L::L] - indptr[0:-1:L]  # entries of rows c*L .. c*L+L-1
    return list(torch.split(flat, per_row.tolist()))


# -- statistics, sizes and checks ---------------------------------------------------------------
def _probabilities(stats: Stats, method: str) -> torch.Tensor:
    return _per_token(stats, stats.K, method)


def _per_token(stats: Stats, x: torch.Tensor, method: str) -> torch.Tensor:
    """x / T as float64 [C, L, N] on CPU, refusing cultures without tokens."""
    empty = [stats.cultures[i] for i in torch.nonzero(stats.T == 0).flatten().tolist()]
    if empty:
        raise DataError(
            f"selector {method!r}: culture(s) {', '.join(map(repr, empty))} have no counted "
            "tokens (T = 0), so their activation probability is undefined; record statistics "
            "with items of these cultures or drop them from the stats"
        )
    T = stats.T.double().cpu().view(-1, 1, 1)
    x = x.detach().cpu()
    if x.dtype == torch.float64:
        return x / T
    # int64 K: convert, then divide in place. torch.div(K, T) promotes element by element and a
    # second [C, L, N] buffer costs more than the division (0.28 s vs 0.47 s for 25 x 28 x 18944
    # on the 2-core bench CPU). Same values as Stats.P.
    return x.to(torch.float64).div_(T)


def _normalised(P: torch.Tensor) -> torch.Tensor:
    """P / sum_c P over cultures, 0 where the sum is 0 (as LAPE)."""
    total = P.sum(0, keepdim=True)
    return torch.where(total > 0, P / total, 0.0)


def _check_ratio(ratio: float, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise UsageError(f"{name} must be a share in [0, 1] (0.005 = 0.5 %), got {ratio!r}")
    return float(ratio)


def _count(size: int, ratio: float) -> int:
    """k = round(size * ratio): Python rounding, the expression order LAPE uses."""
    return round(size * _check_ratio(ratio))


def _rank_of(size: int, rate: float) -> int:
    """1-based rank of the ``rate`` order statistic of ``size`` values, clamped to [1, size]."""
    return min(max(round(size * rate), 1), size)


def _require_cultures(stats: Stats, method: str, at_least: int) -> None:
    if len(stats.cultures) < at_least:
        raise UsageError(
            f"selector {method!r} contrasts cultures and needs at least {at_least}, got "
            f"{len(stats.cultures)} ({stats.cultures}); use 'lap' for a single culture"
        )


def _repeat(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch.repeat_interleave via numpy: the torch op takes ~7 ms even for tiny inputs with 2
    intra-op threads on the busy bench CPU (35 us with one)."""
    return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))


def _draw(
    counts: torch.Tensor, L: int, N: int, per_layer: bool, gen: torch.Generator
) -> torch.Tensor:
    """Flat indices of one uniform draw without replacement: counts [1] over all L*N, or
    counts [L] within each layer."""
    if not per_layer:
        return torch.randperm(L * N, generator=gen)[: int(counts[0])]
    return torch.cat(
        [torch.randperm(N, generator=gen)[: int(k)] + layer * N for layer, k in enumerate(counts)]
    )
