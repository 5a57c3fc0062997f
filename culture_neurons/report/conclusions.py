"""What a report may conclude, and how it writes a number with its uncertainty (shared by the
mc and lm reports).

Every value is written with its 95 % paired-bootstrap interval; a difference from 0 is claimed
only where that interval excludes 0 (cells and summaries whose interval holds 0 are marked as
not distinguishable from no effect); a method "beats RND" only where its p-value against its
own size-matched RND control is below :data:`LEVEL`; a method "wins" a measure only where its
paired bootstrap difference with the runner-up excludes 0. Nothing is called "most selective"
or "significant" without the interval or p-value of the same run beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from culture_neurons.report.files import RunFiles, num
from culture_neurons.report.tables import fmt

LEVEL = 0.05  # p-value threshold of the "beats RND" column
HOLDS_ZERO_NOTE = (
    "Values in **bold** have a 95 % interval that excludes 0; plain values' intervals hold 0: "
    "not distinguishable from no effect."
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


def holds_zero(ci) -> bool | None:
    """Whether an interval ``[lo, hi]`` holds 0 (None when undefined)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return ci[0] <= 0 <= ci[1]


def with_ci(x, ci, decimals: int, mark: bool = True) -> str:
    """``value [lo, hi]``; with ``mark``, the value is bold when the interval excludes 0."""
    text = fmt(x, decimals)
    if text == "n/a":
        return text
    if ci and ci[0] is not None and ci[1] is not None:
        if mark and holds_zero(ci) is False:
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


def beats_rnd(ev: dict, key: str = "gap") -> bool | None:
    """Whether the method's ``key`` beats its own RND control: ``p_<key>_vs_rnd`` < LEVEL
    (None without RND draws)."""
    p = ev.get(f"p_{key}_vs_rnd")
    return None if p is None else p < LEVEL


def beats_cell(ev: dict, key: str = "gap") -> str:
    """The "beats RND" column: yes / no with the p-value it rests on."""
    verdict = beats_rnd(ev, key)
    if verdict is None:
        return "n/a (no RND draws)" if not ev.get("rnd") else "n/a (undefined)"
    word = ("yes" if verdict else "no") if _direction(ev, key) != "either" else (
        "differs" if verdict else "no")  # fmt: skip
    return f"{word} (p = {fmt_p(ev.get(f'p_{key}_vs_rnd'), ev.get('p_resolution'))})"


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
    value = with_ci(ev.get(measure.key), ev.get(f"{measure.key}_ci"), measure.decimals,
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
    p = ev.get(f"p_{measure.key}_vs_rnd")
    if p is not None:
        rnd = f"RND {rnd_cell(ev, measure.key, measure.decimals)}"
        verdict = "beats" if beats_rnd(ev, measure.key) else "does not beat"
        if measure.direction(run) == "either":
            verdict = "differs from" if beats_rnd(ev, measure.key) else "does not differ from"
        text += (f"; it {verdict} its size-matched RND control ({rnd}, p = "
                 f"{fmt_p(p, ev.get('p_resolution'))})")  # fmt: skip
    return text + "."


def uncertainty_note(run: RunFiles) -> str:
    """How the intervals and p-values were computed, with this run's numbers."""
    ev = run.first
    B, conf = ev.get("resamples"), ev.get("confidence", 0.95)
    text = (f"Intervals: {100 * conf:.0f} % percentile intervals of a paired bootstrap over the "
            f"evaluation items ({B} resamples; each culture's items resampled within it, the "
            "same resamples for the full model, every method and every RND draw). ")  # fmt: skip
    rnd = ev.get("rnd")
    if rnd:
        D, C = rnd.get("draws"), len(run.cultures)
        text += (
            f"RND: for every method, {D} draws of uniform random sets of that method's own "
            "per-culture sizes (methods of identical sizes share draws). p-value: a "
            "permutation test in which each culture's set is swapped with that culture's set "
            f"of any draw (the method's own included: {D + 1} sets per culture, "
            f"{D + 1}^{C} recombined matrices), p = the share of recombinations at least as "
            "selective as the method, on each resample, averaged over resamples; its floor "
            f"here is {fmt(ev.get('p_resolution'), 4)}. Where an effect sits in a few cultures, "
            f"each of them weighs as one set among {D + 1}: more draws, more power. "
            f"'beats RND' means p < {LEVEL}."
        )
    else:
        text += "No RND draws were run: nothing is compared with chance."
    return text

