"""Tests of a method's sets against random sets of the same sizes (SPEC "Uncertainty and
controls"): :func:`compare_to_random`, the one test the pipeline and any user run.

Inputs are per-item changes: ``method [C, n]`` (row s = the change of every evaluation item's
score under culture s's set), ``draws [D, C, n]`` the same for D random draws of the method's
sizes, ``culture [n]``. A culture's cell is the plain mean of its items' changes (pass
token-weighted quantities scaled so their plain mean is the weighted one). Cultures without
items leave their cells out, as :func:`culture_neurons.scoring.metrics.summaries` does.

**Partly computed** (``--matrix sample``): NaN marks an item not computed under a set; a cell
is the mean of its computed items. Every test stays exact as long as which items were computed
does not depend on the sets' effects and is the same for the method and its draws (a share of
items, drawn before, for every off-diagonal cell): the recombination tests' rows are then
computed alike for every set, so exchangeable under their null; the own-row test runs on the
items computed under every row; the total's interval is stratified by which rows an item has.
Their level, power and the interval's coverage at a sampled share: ``tests/scoring/
test_sampled``.

**gap against RND** (the row-recombination randomization test, computed once on the observed
changes; no bootstrap). Null: for every culture s, the method's set for s is exchangeable with
the D draws' sets for s (one more uniform random set of that size), independently across s.
The gap is a sum of per-row terms ``g_s = diag_s / n_diag - off_s / n_off``, so under the null
the method's gap is one of the (D + 1)^C gaps of the matrices whose row s comes from any of the
D + 1 sets of s, all equally likely. p = the share of them as or more extreme (exact
enumeration when (D + 1)^C <= EXACT_LIMIT; else PERMUTATIONS uniform ones and the observed
counted: (1 + #) / (PERMUTATIONS + 1)). Values within a tolerance relative to the scale
(TIE_RTOL) are ties and count as extreme: every draw equal to the method gives p = 1.
Two-sided (direction 0): twice the smaller one-sided p, capped at 1. Its power comes from the
draws' spread: a few draws resolve p down to 1 / (D + 1)^C.

**specificity** = the share of the oriented effect (``direction x change``: harm, for
ablation) that lands on the changed culture, ``sum_s e[s, s] / sum_{s, c'} e[s, c']`` over the
per-culture cells (= self / (self + (C - 1) cross)). Undefined (NaN) where the total oriented
effect's 95 % interval (a stratified t interval over items) holds 0 or lies below it: there is
no harm to share. Where it is defined, a share above 1 (the other cultures gained) is 1 and
one below 0 (the own culture gained) is 0: a sign flip never inflates it (direction 0
orients by the sign of the method's own total). Its test:

- where the draws' mean total effect is indistinguishable from 0 (or there are no draws), their
  specificity is 0/0: the method is compared with the uniform share 1/C. ``spec > 1/C`` is
  ``oriented gap > 0`` (self > cross); the test is the own-row permutation test over items:
  null = for every item, its own culture's set changes it like any other culture's set (the
  row that counts as "own" is exchangeable among the C rows, independently across items);
  the statistic is the oriented gap, a sum of per-item terms; PERMUTATIONS random
  reassignments, the observed counted. One-sided (a larger share is more selective).
- where RND does something, the row-recombination test above on the ratio (a recombination
  whose total is not positive has no share and ranks as the least selective: valid, since the
  ranking is one fixed order).

Both specificity tests' level and power are simulated in ``tests/scoring/test_random_control``.
Every test here is exact (non-randomized), so on binary changes with few informative items its
level is below the nominal one by discreteness: the uniform-share test rejected 2.8 % at 0.05
(C = 3, 20 items per culture, 30 % of right answers lost; 1000 runs), 4-5 % at C = 8 or on
continuous changes; the gap test 3.5-4.5 % at C = 3 with D = 10 draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from culture_neurons.errors import UsageError
from culture_neurons.scoring.metrics import per_culture_mean
from culture_neurons.scoring.uncertainty import t_quantile

LOWER, HIGHER, TWO_SIDED = -1, 1, 0
MEASURES = ("gap", "specificity")
EXACT_LIMIT = 200_000  # enumerate every recombination up to this many
PERMUTATIONS = 4000  # random recombinations / reassignments otherwise (p floor 1/4001)
TIE_RTOL = 1e-9  # relative to the statistic's scale: float rounding never breaks a tie
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_to_random` found. ``p`` and ``value`` are NaN where undefined."""

    measure: str  # gap or specificity
    value: float  # the method's statistic
    p: float  # against the null named by ``test``
    test: str  # "recombination" (vs RND), "uniform share" (vs 1/C), "undefined"
    direction: int  # -1 lower, +1 higher, 0 either (two-sided); specificity: always higher
    null_size: int  # recombinations / reassignments the p counts over (the observed included)
    exact: bool  # every recombination enumerated
    p_floor: float  # the smallest p this null can give
    draws_value: list = field(default_factory=list)  # each draw's statistic
    reference: float | None = None  # 1/C where compared with the uniform share
    total: float = math.nan  # specificity: the method's total oriented effect
    total_ci: tuple = (math.nan, math.nan)  # ... and its interval
    rnd_total_ci: tuple | None = None  # the draws' mean total oriented effect's interval
    note: str = ""  # why a value is undefined, or which null was used

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: _jsonable(v) for k, v in out.items()}


def compare_to_random(method, draws, culture, measure: str = "gap", direction: int = -1,
                      C: int | None = None, permutations: int = PERMUTATIONS, seed: int = 0,
                      confidence: float = CONFIDENCE) -> Comparison:  # fmt: skip
    """Test a method's per-culture sets against D random draws of the same sizes.

    Args:
        method: float ``[C, n]`` per-item change of the score under culture s's set (row s).
        draws: float ``[D, C, n]`` the same for D random draws of the same sizes (D may be 0
            for specificity: then it is compared with the uniform share 1/C).
        culture: int ``[n]`` each item's culture in ``0..C-1``.
        measure: ``"gap"`` (self - cross) or ``"specificity"`` (share of the oriented effect
            on the changed culture).
        direction: which change is the effect: -1 a drop (accuracy under ablation), +1 a rise
            (NLL, flips), 0 either (two-sided; specificity orients by the method's sign).
        C: cultures (default: ``method.shape[0]``).
        permutations: random recombinations / reassignments when not enumerated.
        seed: of those random draws (the result is deterministic given it).
        confidence: of the total-effect interval that decides whether a share is defined.

    Returns:
        A :class:`Comparison` (``.p``, ``.value`` and what the p rests on; see the module doc).

    Raises:
        UsageError: shapes disagree, an unknown measure or direction, culture ids out of range.
    """
    method, draws, culture, C = _check(method, draws, culture, measure, direction, C)
    if measure == "gap":
        return _gap(method, draws, culture, C, direction, permutations, seed)
    return _specificity(method, draws, culture, C, direction, permutations, seed, confidence)


def _check(method, draws, culture, measure, direction, C):
    method = torch.as_tensor(method, dtype=torch.float64)
    draws = torch.as_tensor(draws, dtype=torch.float64)
    culture = torch.as_tensor(culture, dtype=torch.int64)
    if measure not in MEASURES:
        raise UsageError(f"measure must be one of {MEASURES}, got {measure!r}")
    if direction not in (LOWER, HIGHER, TWO_SIDED):
        raise UsageError(f"direction must be -1, 0 or 1, got {direction!r}")
    C = method.shape[0] if C is None else C
    if method.dim() != 2 or method.shape[0] != C:
        raise UsageError(f"method must be [C={C}, n] per-item changes, got {tuple(method.shape)}")
    n = method.shape[1]
    if draws.numel() == 0:
        draws = draws.reshape(0, C, n)
    if draws.dim() != 3 or draws.shape[1:] != method.shape:
        raise UsageError(f"draws must be [D, {C}, {n}] (the method's shape per draw), got "
                         f"{tuple(draws.shape)}")  # fmt: skip
    if culture.shape != (n,) or (n and (culture.min() < 0 or culture.max() >= C)):
        raise UsageError(f"culture must be [{n}] ids in 0..{C - 1}, got shape "
                         f"{tuple(culture.shape)}")  # fmt: skip
    if measure == "gap" and draws.shape[0] == 0:
        raise UsageError("the gap test needs at least one random draw (draws [D >= 1, C, n])")
    return method, draws, culture, C


def cells(change: torch.Tensor, culture: torch.Tensor, C: int) -> torch.Tensor:
    """Per-culture means ``[..., C(sets), C(cultures)]`` of per-item changes [..., C, n] over
    the items computed (NaN: not computed under that set; a cell with none is NaN)."""
    return per_culture_mean(change, culture, C)


def row_terms(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row terms of square matrices ``m [..., C, C]``: (gap term, diagonal, row total),
    each [..., C], so that gap = sum of gap terms and the share = sum diag / sum row totals.
    Undefined cells (a culture without items) are left out of every mean."""
    C = m.shape[-1]
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    defined = ~torch.isnan(m)
    d_def = ~torch.isnan(diag)
    n_diag = d_def.sum(-1, keepdim=True).double()  # the same for every set
    n_off = (defined.sum((-2, -1)) - d_def.sum(-1)).unsqueeze(-1).double()
    on = diag.nan_to_num(0.0)
    off = m.nansum(-1) - on
    gap = on / n_diag - (off / n_off if C > 1 else torch.full_like(on, math.nan))
    return gap, on, on + off


def _gap(method, draws, culture, C, direction, permutations, seed) -> Comparison:
    parts = torch.cat([method[None], draws])  # [D + 1, C, n], the method first
    terms = row_terms(cells(parts, culture, C))[0].numpy()  # [D + 1, C]
    value = terms[0].sum()
    draws_value = terms[1:].sum(-1).tolist()
    if math.isnan(value):
        return Comparison("gap", math.nan, math.nan, "undefined", direction, 0, False, math.nan,
                          draws_value, note="gap undefined (one culture, or none with items)")
    null, exact = _recombined(terms[None], permutations, seed)  # [1, R]
    tol = TIE_RTOL * (np.abs(terms).max(0).sum() + 1e-300)
    p = _p(null[0], value, tol, direction, exact)
    return Comparison("gap", float(value), p, "recombination", direction, _size(null, exact),
                      exact, _floor(null, exact), draws_value)  # fmt: skip


def _recombined(terms: np.ndarray, permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """Sums over rows of recombined per-row terms ``terms [K, sets, C]`` -> [K, R]: row s from
    any of the sets. Every combination (the method's own, all rows from set 0, first) when
    ``sets^C <= EXACT_LIMIT``; else the observed plus ``permutations`` uniform ones."""
    K, sets, C = terms.shape
    if sets**C <= EXACT_LIMIT:
        total = np.zeros((K, 1))
        for s in range(C):
            total = (total[:, :, None] + terms[:, None, :, s]).reshape(K, -1)
        return total, True
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, sets, size=(permutations, C))  # [R, C]
    sampled = terms[:, pick, np.arange(C)].sum(-1)  # [K, R]
    return np.concatenate([terms[:, 0].sum(-1, keepdims=True), sampled], 1), False


def _p(null: np.ndarray, value: float, tol: float, direction: int, exact: bool) -> float:
    """Share of ``null`` (the observed included) as or more extreme than ``value``."""
    if direction == TWO_SIDED:
        one = [_p(null, value, tol, d, exact) for d in (LOWER, HIGHER)]
        return min(1.0, 2 * min(one))
    extreme = null <= value + tol if direction == LOWER else null >= value - tol
    return float(extreme.mean())


def _size(null: np.ndarray, exact: bool) -> int:
    return int(null.shape[-1])


def _floor(null: np.ndarray, exact: bool) -> float:
    return 1.0 / null.shape[-1]


def total_interval(e: torch.Tensor, culture: torch.Tensor, C: int,
                   confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """The total effect ``sum_{s, c'} cell[s, c']`` of oriented changes ``e [..., C, n]``
    (averaged over leading draws) and its stratified t interval over items. The total is
    ``sum_i y_i`` with ``y_i`` = item i's change under each row over that cell's computed
    items (``x_i / n_c`` when every item is computed), so its variance is ``sum_g n_g var_g(y)``
    over strata g of items computed under the same rows within a culture (a share sampled for
    the off-diagonal cells is one stratum, the rest another; Welch-Satterthwaite df)."""
    e = e.double().reshape(-1, C, e.shape[-1])  # [D, C, n]
    computed = ~torch.isnan(e)
    onehot = torch.zeros(C, culture.numel(), dtype=torch.float64)
    onehot[culture, torch.arange(culture.numel())] = 1
    count = computed.double() @ onehot.T  # [D, C rows, C cultures]: computed items per cell
    per_item = count[..., culture]  # [D, C, n]: the count of item i's cell
    y = (e.nan_to_num(0.0) / per_item.clamp_min(1)).sum(1).mean(0).numpy()  # [n]
    # strata: culture and which rows were computed (the same under every draw)
    pattern = computed[0].T.numpy()  # [n, C]
    keys = [(int(c), row.tobytes()) for c, row in zip(culture.tolist(), pattern, strict=True)]
    strata: dict = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    total, parts = float(y.sum()), []
    for members in strata.values():
        yg = y[members]
        if yg.size > 1:
            parts.append((yg.size * yg.var(ddof=1), yg.size - 1))
    var = sum(v for v, _ in parts)
    if not parts:
        return total, (math.nan, math.nan)
    # Welch-Satterthwaite df: a small stratum (the sampled share) carrying most of the
    # variance has fewer df than the items; with one stratum per culture, items - cultures
    # where the cultures' variances are alike.
    df = var**2 / sum(v**2 / d for v, d in parts) if var > 0 else sum(d for _, d in parts)
    half = t_quantile(0.5 + confidence / 2, max(df, 1.0)) * math.sqrt(var)
    return float(total), (float(total - half), float(total + half))


def share(diag_sum, total_sum):
    """The specificity of summed oriented diagonals and totals: diag / total clipped to [0, 1],
    NaN where the total is not positive."""
    diag_sum, total_sum = np.asarray(diag_sum, float), np.asarray(total_sum, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(diag_sum / total_sum, 0.0, 1.0)
    return np.where(total_sum > 0, r, np.nan)


def _specificity(method, draws, culture, C, direction, permutations, seed,
                 confidence) -> Comparison:  # fmt: skip
    if C < 2:
        return Comparison("specificity", math.nan, math.nan, "undefined", HIGHER, 0, False,
                          math.nan, note="specificity needs two cultures or more")  # fmt: skip
    sign = direction
    if direction == TWO_SIDED:  # orient by the method's own total change
        sign = 1 if total_interval(method, culture, C, confidence)[0] >= 0 else -1
    e_m, e_d = sign * method, sign * draws
    total, ci = total_interval(e_m, culture, C, confidence)
    parts = torch.cat([e_m[None], e_d])
    _, on, rows = row_terms(cells(parts, culture, C))  # [D + 1, C]
    values = share(on.sum(-1).numpy(), rows.sum(-1).numpy())
    base = dict(draws_value=values[1:].tolist(), total=total, total_ci=ci)
    if not ci[0] > 0:
        return Comparison("specificity", math.nan, math.nan, "undefined", HIGHER, 0, False,
                          math.nan, note="the total oriented effect's interval holds 0 (or "
                          "lies below it): no effect to share", **base)  # fmt: skip
    value = float(values[0])
    rnd_ci = total_interval(e_d, culture, C, confidence)[1] if draws.shape[0] else None
    rnd_acts = rnd_ci is not None and rnd_ci[0] > 0
    if not rnd_acts:
        p, size = _own_row_test(e_m, culture, C, permutations, seed)
        note = ("random sets of these sizes do nothing distinguishable from 0: compared with "
                "the uniform share 1/C (own-row permutation test)")  # fmt: skip
        return Comparison("specificity", value, p, "uniform share", HIGHER, size, False,
                          1 / size, reference=1 / C, rnd_total_ci=rnd_ci, note=note, **base)
    on_rows, all_rows = on.numpy(), rows.numpy()
    sums, exact = _recombined(np.stack([on_rows, all_rows]), permutations, seed)
    null = np.nan_to_num(share(sums[0], sums[1]), nan=-np.inf)  # no share: least selective
    p = _p(null, value, TIE_RTOL, HIGHER, exact)
    return Comparison("specificity", value, p, "recombination", HIGHER, _size(null, exact),
                      exact, _floor(null, exact), rnd_total_ci=rnd_ci,
                      note="compared with the RND draws' shares (row recombination)", **base)


def _own_row_test(e: torch.Tensor, culture: torch.Tensor, C: int, permutations: int,
                  seed: int) -> tuple[float, int]:  # fmt: skip
    """One-sided p of ``oriented gap > 0`` by reassigning each item's "own" row uniformly
    among the C rows (see the module doc), the observed counted; on the items computed under
    every row (where some were not: the others cannot be reassigned)."""
    complete = ~torch.isnan(e.double()).any(0)  # [n]
    e, culture = e[:, complete], culture[complete]
    counts = torch.bincount(culture, minlength=C).double()
    n_def = int((counts > 0).sum())
    x = e.double().T.numpy()  # [n, C]: item i's change under each row's set
    cult = culture.numpy()
    w = 1.0 / counts.numpy()[cult]  # [n] each item's weight in its culture's mean
    R = x.sum(1, keepdims=True)
    # gap term of item i if row k were its own: (x_k / n_diag - (R - x_k) / n_off) / n_c
    n_off = n_def * (C - 1)
    u = (x / n_def - (R - x) / n_off) * w[:, None]  # [n, C]
    observed = u[np.arange(len(cult)), cult].sum()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, C, size=(permutations, len(cult)))
    null = u[np.arange(len(cult)), pick].sum(1)  # [M]
    tol = TIE_RTOL * (np.abs(u).max(1).sum() + 1e-300)
    count = 1 + int((null >= observed - tol).sum())
    return count / (permutations + 1), permutations + 1


def _jsonable(v):
    if isinstance(v, float | np.floating):
        return None if math.isnan(v) else float(v)
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v
