"""``--matrix screen``: which cells of the ablation matrix are computed exactly, and the matrix
they make with the estimate (SPEC "Matrix modes").

A cell is (set s, evaluated culture c): set s's intervention on culture c's evaluation items.
The estimate (:mod:`culture_neurons.scoring.estimate`) gives every cell at the cost of one
forward and backward per batch of items; the exact matrix costs one prefill per item and
condition. The first order misses the magnitude of realistic sets (by ~10x on Gemma 3 270M,
bench/RESULTS.md), so a cell it fills can change a conclusion: unconfirmed off-diagonal cells
too small shrink cross and inflate specificity. Screening therefore confirms in rounds
(:func:`culture_neurons.pipeline.matrix.screened` runs them):

1. **first cells**: every mask's (each method's and each RND draw's C sets) diagonal, what self
   and the gap rest on, and the ``budget`` off-diagonal cells the estimate finds most affected
   (:func:`confirmed_cells`; the task's ``effect``: the share of changed answers, or the size of
   the NLL change);
2. **drift**: on each of a mask's confirmed cells, the exact effect against the estimated one
   (:func:`worst_cell`); one cell off by more than ``DRIFT_LIMIT`` either way says the estimate
   is off for that mask's sets, whose every cell is then confirmed (never filled with numbers
   known to be off). Per cell, not in aggregate: on Gemma 3 270M, RND draws whose first cells
   summed to within 2x of the estimate held single cells off by 10x and more, and a
   specificity verdict tested against them came out wrong (bench/RESULTS.md). The aggregate
   ratio (:func:`drift`) is reported beside it;
3. **conclusions**: every method's verdicts (each p against RND below :data:`LEVEL` or not,
   the primary one Holm-adjusted; specificity defined or not) and its summaries are computed
   with the unconfirmed cells filled three ways (:data:`FILLS`): the estimate, and the
   estimate with every estimated change (the letter margins' shifts, the NLL change) divided
   and multiplied by ``DRIFT_LIMIT``, the error drift lets pass. Where a verdict differs
   between fills, or a summary moves by more than ``POINT_SHARE`` of its interval's
   half-width, or two methods' order by primary gap is within the fills' spread
   (:func:`unsettled`), half of the unconfirmed cells of the method's mask and of
   its RND draws are confirmed, those the fills put furthest apart (:func:`next_cells`), and
   the conclusions checked again, until they settle (at worst every cell is exact).

A conclusion screening reports is thus one that an estimate off by up to ``DRIFT_LIMIT`` on
every unconfirmed cell would not change; where it could, the numbers are exact. What drift
cannot see: a mask whose first cells change nothing while the estimate misses changes
elsewhere in it; on sets large enough to matter the diagonal changes, and the ratio shows the
miss (tests/pipeline/test_matrix_modes.py). The first cells bound no other cell: the error
model is checked on them only, and bench/bench_screen.py compares conclusions with exact's.
On the runs measured there the first order is off by more than 2x on some first cell of
nearly every realistic mask, so screening computes nearly the whole matrix: it keeps the
conclusions, not the cost (bench/RESULTS.md).
Cost: 1 + (C + budget) / C conditions per mask that neither drifts nor is unsettled, between
that and C per other mask (exact: C per mask), one forward and backward per item for the
estimate, and per round the tests of every method under three fills (no model work).

Symbols: S sets (masks x C, in :func:`culture_neurons.pipeline.matrix.combine`'s order: mask i's
set of culture j is row i * C + j), C cultures, n evaluation items.
"""

from __future__ import annotations

import math

import torch

from culture_neurons.eval_schema import SUMMARIES, measures_of, primary

DRIFT_LIMIT = 2.0  # exact / estimated effect of any confirmed cell of a mask, either way
LEVEL = 0.05  # a p below it is a verdict ("beats RND")
POINT_SHARE = 0.5  # of a summary's interval half-width: how far a fill may move it
# How unconfirmed cells are filled (module doc, 3.): the estimated change x each scale, the
# range the drift check lets pass.
FILLS = {"estimate": 1.0, "smaller": 1 / DRIFT_LIMIT, "larger": DRIFT_LIMIT}


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


def drift(exact_effect: torch.Tensor, estimated_effect: torch.Tensor, confirmed: torch.Tensor,
          C: int) -> torch.Tensor:  # fmt: skip
    """float64 ``[masks]``: per mask, the summed exact effect of its confirmed cells over their
    summed estimated effect (effects ``[S, C]`` >= 0; NaN cells left out). 1 where both are 0
    (nothing to drift), inf where only the estimate is 0."""
    ex, est, both = _compared(exact_effect, estimated_effect, confirmed)
    ex = ex.where(both, 0.0).view(-1, C * C).sum(1)
    est = est.where(both, 0.0).view(-1, C * C).sum(1)
    ratio = ex / est
    ratio[(ex == 0) & (est == 0)] = 1.0
    return ratio


def worst_cell(exact_effect: torch.Tensor, estimated_effect: torch.Tensor,
               confirmed: torch.Tensor, C: int) -> torch.Tensor:  # fmt: skip
    """float64 ``[masks]``: per mask, the largest factor by which one of its confirmed cells'
    exact effect departs from the estimated one, ``max(r, 1 / r)`` of ``r = exact /
    estimated`` (effects ``[S, C]`` >= 0): 1 where both are equal (0 included), inf where only
    one is 0; NaN cells left out, 1 for a mask without a cell to compare."""
    ex, est, both = _compared(exact_effect, estimated_effect, confirmed)
    r = ex / est
    factor = torch.maximum(r, 1 / r).where(ex != est, 1.0)
    return factor.where(both, 1.0).view(-1, C * C).amax(1)


def _compared(exact_effect: torch.Tensor, estimated_effect: torch.Tensor,
              confirmed: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Both effects in float64 and the cells drift compares them on: confirmed, neither NaN."""
    ex, est = exact_effect.double(), estimated_effect.double()
    return ex, est, confirmed & ~(torch.isnan(ex) | torch.isnan(est))


def drifts(factor: torch.Tensor) -> torch.Tensor:
    """bool ``[masks]``: the masks with a confirmed cell off by more than :data:`DRIFT_LIMIT`
    (``factor``: :func:`worst_cell`)."""
    return factor > DRIFT_LIMIT


def next_cells(spread: torch.Tensor, confirmed: torch.Tensor, masks: list[int],
               C: int) -> torch.Tensor:  # fmt: skip
    """``[S, C]`` bool: for each mask of ``masks`` (indices in combine's order), the half
    (rounded up) of its unconfirmed cells that ``spread`` ``[S, C]`` ranks highest (how far
    the fills put a cell apart: the cells a conclusion can rest on; NaN last). Halving
    confirms every cell of a mask within ``log2(C * C)`` rounds, and the few cells that carry
    the effect first. Ties go to the first cell in row-major order."""
    out = torch.zeros_like(confirmed)
    for i in masks:
        rows = slice(i * C, (i + 1) * C)
        open_ = ~confirmed[rows].flatten()
        left = int(open_.sum())
        if not left:
            continue
        score = spread[rows].double().flatten().nan_to_num(-1.0).where(open_, -math.inf)
        pick = torch.argsort(score, descending=True, stable=True)[: (left + 1) // 2]
        block = out[rows].flatten()
        block[pick] = True
        out[rows] = block.view(C, C)
    return out


def whole(masks: list[int], S: int, C: int) -> torch.Tensor:
    """``[S, C]`` bool: every cell of the masks ``masks`` (indices in combine's order)."""
    out = torch.zeros(S, C, dtype=torch.bool)
    for i in masks:
        out[i * C : (i + 1) * C] = True
    return out


def conclusions(res: dict) -> dict:
    """What decides a method's verdicts in its eval JSON ``res``: ``{key: bool}``, each p
    against RND below :data:`LEVEL` (the primary one Holm-adjusted) and each specificity
    defined or not."""
    out = {}
    primary = res.get("primary") or {}
    if primary.get("p_adj") is not None:
        out["primary"] = primary["p_adj"] < LEVEL
    for m in measures_of(res):
        for s in ("gap", "specificity"):
            p = res.get(m.p(s))
            out[m.p(s)] = p is not None and p < LEVEL
        out[m.summary("specificity") + " defined"] = res.get(m.summary("specificity")) is not None
    return out


def moved(a: dict, b: dict) -> list[str]:
    """The summaries of ``b`` further from ``a``'s than :data:`POINT_SHARE` of ``a``'s interval
    half-width (a summary defined in one and not the other counts)."""
    out = []
    for m in measures_of(a):
        for s in SUMMARIES:
            k = m.summary(s)
            x, y, ci = a.get(k), b.get(k), a.get(m.ci(s))
            if (x is None) != (y is None):
                out.append(k)
            elif x is not None and ci and None not in ci:
                half = (ci[1] - ci[0]) / 2
                if abs(x - y) > POINT_SHARE * half + 1e-12 * max(1.0, abs(x)):
                    out.append(k)
    return out


def unsettled(filled: dict[str, dict]) -> dict[str, list[str]]:
    """``{method: what differs}`` between the eval JSONs of the same run under each fill
    (``{fill: {method: eval JSON}}``, the estimate's first): the methods whose verdicts,
    summaries or rank (:func:`close_ranks`) depend on how the unconfirmed cells are filled
    (module doc, 3.)."""
    first, *others = filled.values()
    out: dict[str, list[str]] = {}
    for name, res in first.items():
        want = conclusions(res)
        why = []
        for other in others:
            got = conclusions(other[name])
            why += [f"{k} verdict" for k in want if got.get(k) != want[k]]
            why += moved(res, other[name])
        if why:
            out[name] = sorted(set(why))
    for name in close_ranks(filled):
        out[name] = sorted({*out.get(name, []), "rank"})
    return out


def close_ranks(filled: dict[str, dict]) -> list[str]:
    """The methods whose order by primary gap the fills could change: two methods whose
    ranges of primary gap over the fills, each widened by its own width, overlap (a rank the
    fills agree on by less than their spread is not settled either)."""
    ranges = {}
    for name in next(iter(filled.values())):
        values = [res.get(primary(res).summary("gap"))
                  for res in (results[name] for results in filled.values())]  # fmt: skip
        if None in values:
            continue
        lo, hi = min(values), max(values)
        ranges[name] = (lo - (hi - lo), hi + (hi - lo), hi > lo)
    names = sorted(ranges)
    return sorted({n for a in names for b in names if a < b
                   and (ranges[a][2] or ranges[b][2])  # the fills move one of them
                   and ranges[a][0] <= ranges[b][1] and ranges[b][0] <= ranges[a][1]
                   for n in (a, b)})  # fmt: skip


def conditions(confirmed: torch.Tensor, cultures: list[int], full: bool = True) -> list[int]:
    """The conditions an item group of ``cultures`` (indices) needs exactly: the full model
    (-1; with ``full``) and every set confirmed on one of them."""
    needed = confirmed[:, sorted(set(cultures))].any(dim=1)
    return [-1] * full + torch.nonzero(needed).flatten().tolist()


def prefills(confirmed: torch.Tensor, culture: torch.Tensor) -> int:
    """Item-condition prefills of the confirmed cells (``[S, C]``; ``culture`` [n])."""
    counts = torch.bincount(culture, minlength=confirmed.shape[1])
    return int((confirmed.long() * counts).sum())


def combine(exact: torch.Tensor, estimated: torch.Tensor, confirmed: torch.Tensor,
            culture: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``[1 + S, n]``: row 0 and the confirmed cells' items from ``exact``, every other item
    from ``estimated`` (already put onto the exact full model's scores, see the tasks'
    ``onto``)."""
    take = confirmed[:, culture]  # [S, n]: item i of culture c under set s is exact
    return torch.cat([exact[:1], torch.where(take, exact[1:], estimated[1:])])


def finite(x: float) -> float | None:
    """JSON-ready ratio: inf and NaN become None."""
    return x if math.isfinite(x) else None
