"""What a report may conclude, and how it writes a number with its uncertainty (shared by the
mc and lm reports).

Every value is written with its 95 % paired-bootstrap interval. The headline speaks only of the
run's one **primary** test (``primary`` in the eval JSONs: the gap of the task's main measure
against the method's own RND draws), Holm-adjusted across methods: a method "beats RND" there
only where the adjusted p is below :data:`LEVEL`. Every other p is written "secondary,
unadjusted". A summary is bold where its interval excludes 0 (unadjusted, said so); a matrix
cell only where its per-cell test survives Benjamini-Hochberg across the matrix (q < LEVEL). A
method "wins" a measure only where its paired bootstrap difference with the runner-up excludes
0. Nothing is called "most selective" or "significant" without the interval or p-value of the
same run beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from culture_neurons.eval_schema import ci_of, p_adjusted_of, p_of
from culture_neurons.report.files import RunFiles, num
from culture_neurons.report.tables import fmt

LEVEL = 0.05  # p-value threshold of the "beats RND" column
HOLDS_ZERO_NOTE = (
    "Summaries in **bold** have a 95 % interval that excludes 0 (each on its own, unadjusted); "
    "plain values' intervals hold 0: not distinguishable from no effect."
)
CELLS_NOTE = (
    "A change cell is **bold** only where its own test (exact sign test of the items' paired "
    "changes; sign-flip for NLL) survives Benjamini-Hochberg false discovery control across "
    "the matrix at q < 0.05; other cells are plain whatever their interval."
)


@dataclass(frozen=True)
class Measure:
    """A summary of the eval JSONs that methods are compared on."""

    key: str  # JSON key: gap, specificity, flip_gap, ...
    label: str  # what the reader sees
    decimals: int
    unit: str = ""  # after values, e.g. " points"

    def fmt(self, x) -> str:
        return fmt(x, self.decimals)

    def direction(self, run: RunFiles) -> str:
        """``lower``, ``higher`` or ``either`` (two-sided), as the run recorded it."""
        return (run.first.get("direction") or {}).get(self.key, "higher")


def cell_bold(ev: dict, kind: str):
    """[S][C] whether each cell of matrix ``kind`` is bold: its BH-adjusted per-cell q below
    LEVEL (delta matrices; None elsewhere: no cell of them is bold)."""
    q = ev.get(f"{kind}_cell_q")
    if q is None:
        return None
    return [[v is not None and v < LEVEL for v in row] for row in q]


def holds_zero(ci) -> bool | None:
    """Whether an interval ``[lo, hi]`` holds 0 (None when undefined)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return ci[0] <= 0 <= ci[1]


def with_ci(x, ci, decimals: int, mark: bool = True, bold: bool | None = None) -> str:
    """``value [lo, hi]``; with ``mark``, the value is bold when the interval excludes 0, or
    when ``bold`` (a cell's own adjusted test) says so where it is given."""
    text = fmt(x, decimals)
    if text == "n/a":
        return text
    if bold:
        text = f"**{text}**"
    if ci and ci[0] is not None and ci[1] is not None:
        if bold is None and mark and holds_zero(ci) is False:
            text = f"**{text}**"
        text += f" [{fmt(ci[0], decimals)}, {fmt(ci[1], decimals)}]"
    return text


def fmt_p(p, resolution) -> str:
    """A p-value; at its floor (the run's ``p_resolution``) it says so."""
    if p is None:
        return "n/a"
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    if resolution is not None and p <= resolution * (1 + 1e-9):
        text += " (floor)"
    return text


def is_primary(ev: dict, key: str) -> bool:
    return (ev.get("primary") or {}).get("measure") == key


def beats_rnd(ev: dict, key: str = "gap") -> bool | None:
    """Whether the method's ``key`` beats its own control: the Holm-adjusted p of the primary
    measure, the plain p of any other (secondary) one, below LEVEL (None when undefined)."""
    p = ev.get(p_adjusted_of(key)) if is_primary(ev, key) else ev.get(p_of(key))
    return None if p is None else p < LEVEL


def beats_cell(ev: dict, key: str = "gap") -> str:
    """The "beats RND" column: yes / no with the p-value it rests on, adjusted or labelled."""
    verdict = beats_rnd(ev, key)
    test = (ev.get("tests") or {}).get(key) or {}
    if verdict is None:
        if test.get("test") == "undefined":
            return "n/a (undefined: " + (test.get("note") or "no effect") + ")"
        return "n/a (no RND draws)" if not ev.get("rnd") else "n/a (undefined)"
    word = ("yes" if verdict else "no") if _direction(ev, key) != "either" else (
        "differs" if verdict else "no")  # fmt: skip
    p = fmt_p(ev.get(p_of(key)), ev.get("p_resolution") if key.endswith("gap") else None)
    against = " vs 1/C" if test.get("test") == "uniform share" else ""
    if is_primary(ev, key):
        return f"{word} (Holm-adjusted p = {fmt_p(ev.get(p_adjusted_of(key)), None)}; p = {p})"
    return f"{word}{against} (p = {p}, secondary, unadjusted)"


def rnd_cell(ev: dict, key: str, decimals: int) -> str:
    """RND's value of ``key`` as mean ± sd over its draws."""
    rnd = ev.get("rnd")
    if not rnd or rnd.get(f"{key}_mean") is None:
        return "n/a"
    sd = rnd.get(f"{key}_sd")
    text = fmt(rnd[f"{key}_mean"], decimals)
    return text + (f" ± {fmt(sd, decimals)}" if sd is not None else "")


def _direction(ev: dict, key: str) -> str:
    return (ev.get("direction") or {}).get(key, "higher")


def ranked(run: RunFiles, measure: Measure) -> list[str]:
    """Methods best first on ``measure`` (``either``: largest magnitude), undefined last."""
    direction = measure.direction(run)

    def key(method: str) -> tuple[bool, float]:
        v = num(run.evals[method].get(measure.key))
        if math.isnan(v):
            return (True, 0.0)
        return (False, {"lower": v, "higher": -v}.get(direction, -abs(v)))

    return sorted(run.evals, key=key)


def paired_difference(run: RunFiles, a: str, b: str, key: str) -> tuple[float, list] | None:
    """``a - b`` of summary ``key`` and its 95 % interval, from the per-resample values both
    JSONs keep (the same resamples: paired); None where they are missing or differ in seed."""
    ra, rb = run.evals[a], run.evals[b]
    xa, xb = (ra.get("resampled") or {}).get(key), (rb.get("resampled") or {}).get(key)
    if xa is None or xb is None or len(xa) != len(xb) or ra.get("bootstrap_seed") != rb.get(
        "bootstrap_seed"
    ):
        return None
    d = np.array([num(x) for x in xa]) - np.array([num(x) for x in xb])
    if _direction(ra, key) == "either":
        d = np.abs([num(x) for x in xa]) - np.abs([num(x) for x in xb])
    d = d[~np.isnan(d)]
    if not d.size:
        return None
    tail = (1 - ra.get("confidence", 0.95)) / 2
    lo, hi = np.quantile(d, [tail, 1 - tail])
    point = num(ra.get(key)) - num(rb.get(key))
    if _direction(ra, key) == "either":
        point = abs(num(ra.get(key))) - abs(num(rb.get(key)))
    return point, [float(lo), float(hi)]


def winner_line(run: RunFiles, measure: Measure) -> str | None:
    """One sentence: which method is ahead on ``measure``, by how much over the runner-up (with
    the paired interval) and against its RND control (with p); None if nobody has a value."""
    order = [m for m in ranked(run, measure) if not math.isnan(num(run.evals[m].get(measure.key)))]
    if not order:
        return None
    best, ev, f = order[0], run.evals[order[0]], measure.fmt
    value = with_ci(ev.get(measure.key), ev.get(ci_of(measure.key)), measure.decimals,
                    mark=False)  # fmt: skip
    way = {"lower": "lowest", "higher": "highest"}.get(measure.direction(run), "largest")
    text = f"- **{measure.label}**: {best} has the {way} ({value}{measure.unit})"
    if len(order) > 1:
        second = order[1]
        diff = paired_difference(run, best, second, measure.key)
        if diff is None:
            text += f"; against {second} no paired resamples are stored"
        else:
            point, ci = diff
            apart = holds_zero(ci) is False
            text += (f"; {'ahead of' if apart else 'not distinguishable from'} {second} "
                     f"(difference {f(point)} [{f(ci[0])}, {f(ci[1])}]"
                     f"{measure.unit}{'' if apart else ', interval holds 0'})")  # fmt: skip
    p = ev.get(p_of(measure.key))
    if p is not None:
        rnd = f"RND {rnd_cell(ev, measure.key, measure.decimals)}"
        verdict = "beats" if beats_rnd(ev, measure.key) else "does not beat"
        if measure.direction(run) == "either":
            verdict = "differs from" if beats_rnd(ev, measure.key) else "does not differ from"
        test = ((ev.get("tests") or {}).get(measure.key) or {}).get("test")
        control = "the uniform share 1/C" if test == "uniform share" else (
            f"its size-matched RND control ({rnd})")  # fmt: skip
        if test == "uniform share":
            verdict = "exceeds" if beats_rnd(ev, measure.key) else "does not exceed"
        adjusted = ev.get(p_adjusted_of(measure.key))
        which = (f"Holm-adjusted p = {fmt_p(adjusted, None)}" if is_primary(ev, measure.key)
                 else f"p = {fmt_p(p, None)}, secondary, unadjusted")  # fmt: skip
        text += f"; it {verdict} {control} ({which})"
    return text + "."


def primary_lines(run: RunFiles, measure: Measure) -> list[str]:
    """The headline: each method's primary test, Holm-adjusted across the run's methods."""
    ev0 = run.first
    primary = ev0.get("primary") or {}
    if not primary:
        return []
    lines = [f"**Primary test** (declared before the run, one per task): the {measure.label} "
             f"of each method against its own size-matched RND draws, "
             f"{primary.get('adjustment', 'Holm-adjusted')}. Only these adjusted results are "
             "conclusions; every other p in this report is secondary and unadjusted.", ""]
    for m in ranked(run, measure):
        ev = run.evals[m]
        q, p = ev.get(p_adjusted_of(measure.key)), ev.get(p_of(measure.key))
        value = with_ci(ev.get(measure.key), ev.get(ci_of(measure.key)), measure.decimals,
                        mark=False)  # fmt: skip
        verdict = ("n/a" if q is None else ("**beats RND**" if q < LEVEL else
                   "does not beat RND"))  # fmt: skip
        lines.append(f"- {m}: {verdict} (adjusted p = {fmt_p(q, None)}; p = "
                     f"{fmt_p(p, ev.get('p_resolution'))}); {measure.label} {value}"
                     f"{measure.unit}, RND {rnd_cell(ev, measure.key, measure.decimals)}")
    return lines


def interval_note(run: RunFiles) -> str:
    """Where the run's intervals are unreliable: few items, zero widths, undefined resamples."""
    flags = run.first.get("intervals") or {}
    if not flags:
        return ""
    parts = []
    if not flags.get("reliable", True):
        where = ("each culture's sampled share (--matrix sample) holds as few as"
                 if run.first.get("matrix") == "sample" else "the smallest culture has")
        parts.append(f"**intervals are unreliable here**: {where} "
                     f"{flags.get('smallest_culture')} evaluation items, below the "
                     f"{flags.get('min_items_per_culture')} from which percentile intervals "
                     "were measured to cover (0.78-0.83 at 5 items per culture)")  # fmt: skip
    for ev_name, ev in run.evals.items():
        z = {k: v for k, v in ((ev.get("intervals") or {}).get("zero_width_cells") or {}).items()
             if v}  # fmt: skip
        if z:
            parts.append(f"{ev_name}: " + ", ".join(f"{v} {k} cell(s)" for k, v in z.items())
                         + " with a zero-width interval (no resample moved them: not certainty)")
    for ev_name, ev in run.evals.items():
        und = {k: v for k, v in ((ev.get("intervals") or {}).get("undefined_share") or {}).items()
               if v}  # fmt: skip
        if und:
            parts.append(f"{ev_name}: undefined resamples " + ", ".join(
                f"{k} {100 * v:.0f} %" for k, v in und.items()))  # fmt: skip
    return ("Interval flags: " + "; ".join(parts) + ".") if parts else ""


def uncertainty_note(run: RunFiles) -> str:
    """How the intervals and p-values were computed, with this run's numbers."""
    ev = run.first
    B, conf = ev.get("resamples"), ev.get("confidence", 0.95)
    sampled = ev.get("matrix") == "sample"
    text = (f"Intervals: {100 * conf:.0f} % expanded percentile intervals (Hesterberg's "
            "small-sample correction, at the smallest "
            + ("sampled share's" if sampled else "culture's") + " item count) of a paired "
            f"bootstrap over the evaluation items ({B} resamples; each culture's items resampled "
            + ("within it, its sampled share and its other items apart" if sampled else
               "within it") + ", the same resamples for the full model, every method and "
            "every RND draw). ")  # fmt: skip
    rnd = ev.get("rnd")
    if rnd:
        D, C = rnd.get("draws"), len(run.cultures)
        text += (
            f"RND: for every method, {D} draws of uniform random sets of that method's own "
            "per-culture sizes (methods of identical sizes share draws). Gap vs RND: a "
            "randomization test on the observed per-item changes (no bootstrap), null = each "
            "culture's set of the method is one more random set of its size: each culture's "
            f"row is swapped with that culture's row of any draw ({D + 1} sets per culture, "
            f"{D + 1}^{C} recombined matrices), p = the share at least as extreme, ties "
            f"counted; its floor here is {fmt(ev.get('p_resolution'), 4)}. Specificity is "
            "the share of the oriented effect (harm) on the changed culture, undefined where "
            "the total effect's interval holds 0; it is compared with the RND draws' shares "
            "(the same recombination) where random sets do something, else with the uniform "
            "share 1/C (a permutation test over items of which row is each item's own). "
            f"'beats RND' means p < {LEVEL}: Holm-adjusted for the primary test, unadjusted "
            "(secondary) for every other."
        )
    else:
        text += "No RND draws were run: nothing is compared with chance."
    note = interval_note(run)
    return text + (" " + note if note else "")


def headline_lines(run: RunFiles, measure: Measure, full: str) -> list[str]:
    """The three lines a report opens with (issue #23), quotable as they stand: which method
    finds culture-sensitive neurons on the primary measure (its value, interval and Holm-
    adjusted p), how the other methods fared, and what the size-matched random sets and the
    full model gave (``full``: the full model's headline number, in words). Only adjusted
    results of the primary test are conclusions here; [] where the run declared none."""
    if not (run.first.get("primary") or {}):
        return []
    adjusted = {m: run.evals[m].get(f"p_{measure.key}_vs_rnd_adj") for m in run.evals}
    order = ranked(run, measure)
    winners = sorted((m for m in order if adjusted[m] is not None and adjusted[m] < LEVEL),
                     key=lambda m: (adjusted[m], order.index(m)))  # fmt: skip

    def value(m: str) -> str:
        ev = run.evals[m]
        return (with_ci(ev.get(measure.key), ev.get(f"{measure.key}_ci"), measure.decimals,
                        mark=False) + measure.unit)  # fmt: skip

    def own_and_others(m: str) -> str:
        ev, f = run.evals[m], measure.fmt
        base = measure.key.removesuffix("gap")  # "" or "flip_": the same measure's self, cross
        return (f"its own culture changes by {f(ev.get(base + 'self'))}{measure.unit}, the "
                f"others by {f(ev.get(base + 'cross'))}{measure.unit}")  # fmt: skip

    if winners:
        best = winners[0]
        first = (f"**{best} finds culture-sensitive neurons** on the primary measure, the "
                 f"{measure.label}: {value(best)} ({own_and_others(best)} when each culture's "
                 f"selected neurons are {_verb(run)}), beyond random sets of the same sizes "
                 f"(Holm-adjusted p = {fmt_p(adjusted[best], None)}).")  # fmt: skip
    else:
        defined = [m for m in order if adjusted[m] is not None]
        smallest = min(defined, key=lambda m: adjusted[m]) if defined else None
        first = (f"**No method beats random sets of its own sizes** on the primary measure, "
                 f"the {measure.label}, after Holm adjustment" + (
                     f" (smallest adjusted p = {fmt_p(adjusted[smallest], None)}, {smallest})"
                     if smallest else "") + ".")  # fmt: skip
    others = [m for m in order if not winners or m != winners[0]]
    parts = [f"{m} {'beats' if m in winners else 'does not beat'} RND ({value(m)}, adjusted p "
             f"= {fmt_p(adjusted[m], None)})" for m in others]  # fmt: skip
    second = ("Also: " + "; ".join(parts) + ".") if parts else "The run has one method."
    rnd = [f"{m} {rnd_cell(run.evals[m], measure.key, measure.decimals)}" for m in order]
    third = (f"Random control: the {measure.label} of each method's size-matched random sets "
             f"(mean ± sd over draws) is " + ", ".join(rnd) + f"{measure.unit}; {full}.")
    return [first, "", second, "", third]


def _verb(run: RunFiles) -> str:
    alpha = run.first.get("alpha")
    return "ablated" if run.first.get("intervention", "ablate") == "ablate" else (
        f"steered (alpha = {alpha:g})")  # fmt: skip
