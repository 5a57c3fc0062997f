"""What a report says of estimated numbers (``--matrix estimate`` / ``screen``, SPEC "Matrix
modes": an estimated number is always marked as such), and of sampled ones (``--matrix
sample``: measured, off the diagonal on a share of the items; nothing marked).

A matrix cell computed from the first-order estimate is prefixed with :data:`MARK`; a summary
(self, cross, gap, specificity) resting on one such cell is estimated too, which the notice at
the top of the report says. In screen mode the cells computed exactly are also estimated, and
the two stand side by side in :func:`agreement`: how far the estimate is from the exact number
where both exist, in this run.
"""

from __future__ import annotations

import numpy as np

from culture_neurons.report.files import RunFiles, matrix
from culture_neurons.report.tables import fmt, table

MARK = "~"


def mode(run: RunFiles) -> str:
    return run.first.get("matrix", "exact")


def estimated_cells(ev: dict) -> np.ndarray:
    """[S, C] bool: the cells of ``ev``'s matrices that are estimated."""
    C = len(ev["cultures"])
    if ev.get("matrix", "exact") in ("exact", "sample"):  # sample: measured, on fewer items
        return np.zeros((C, C), dtype=bool)
    if ev.get("confirmed") is None:  # estimate: every cell
        return np.ones((C, C), dtype=bool)
    return ~np.array(ev["confirmed"], dtype=bool)


def marked(text: str, estimated: bool) -> str:
    return MARK + text if estimated and text != "n/a" else text


def notice(run: RunFiles) -> list[str]:
    """The notice at the top of a report whose matrix is not all exact, with its blank line
    (else nothing)."""
    how = mode(run)
    if how == "exact":
        return []
    first = run.first
    if how == "sample":
        return [_sampled(first), ""]
    if how == "estimate":
        what = ("**every number of an intervention below is a first-order estimate** (one "
                "forward and backward per batch of items: each set's effect on the scores is "
                "the sum over its neurons of activation x gradient), not a measurement")  # fmt: skip
    else:
        C = len(run.cultures)
        what = (f"**this matrix was screened**: each mask's diagonal and its "
                f"{first.get('screen_budget')} most affected off-diagonal cells (of "
                f"{C * (C - 1)}) were computed exactly, then more where the estimate drifted "
                "or a conclusion depended on it" + _rounds(first) + "; **every other cell is "
                "a first-order estimate**; the summaries (self, cross, gap, specificity) mix "
                "both")  # fmt: skip
    return [
        f"> **Matrix mode `{how}`**: {what}. Estimated cells are marked `{MARK}`. Their "
        "intervals cover the sampling of the items only, not the estimate's own error; the "
        "full model's numbers are exact. Measured agreement of estimate and exact: "
        "bench/RESULTS.md (\"The matrix from gradients\")"
        + (" and the section \"Estimate against exact\" below." if how == "screen" else "."),
        "",
    ]


def _sampled(ev: dict) -> str:
    """The notice of a ``--matrix sample`` run: measured, off the diagonal on a share."""
    rec = ev.get("sample") or {}
    share, got, of = rec.get("share"), rec.get("sampled_per_culture"), rec.get("items_per_culture")
    counts = (f" ({_span(got)} of {_span(of)} items per culture)" if got and of else "")
    cost = (f"; {rec['prefills']} of the exact matrix's {rec['exact_prefills']} item prefills"
            if rec.get("prefills") else "")  # fmt: skip
    return (f"> **Matrix mode `sample`**: every number is measured (exact prefills), each "
            f"diagonal cell on all its culture's items and each off-diagonal cell on the same "
            f"share {share} of its culture's items{counts}, drawn from the item ids and the seed "
            "before any set ran, the same for every method and RND draw. The tests against RND "
            "stay exact under this sampling (their level is kept; their power is lower than "
            "exact's), cross and the off-diagonal cells' intervals rest on the share"
            f"{cost}. See docs/matrix-modes.md.")  # fmt: skip


def _span(counts: list[int]) -> str:
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _rounds(ev: dict) -> str:
    """What screening's rounds found (:mod:`culture_neurons.pipeline.screen`), in words."""
    rec = ev.get("screen")
    if not rec:
        return ""
    limit = rec["drift_limit"]
    drifting = sorted({m for r in rec["rounds"] for m in r.get("drifting", [])})
    unsettled = sorted({m for r in rec["rounds"] for m in r.get("unsettled", {})})
    parts = [f"a first cell's exact / estimated effect outside [1/{limit:g}, {limit:g}] "
             f"for {', '.join(drifting)}: computed whole" if drifting else
             f"the estimate within {limit:g}x of exact on every first cell of every mask",
             f"conclusions that an estimate off by {limit:g}x would change: {', '.join(unsettled)}"
             " (more of their cells confirmed)" if unsettled else
             f"no conclusion that an estimate off by {limit:g}x would change"]
    cost = f"{rec['prefills']} of the exact matrix's {rec['exact_prefills']} item prefills"
    return f" ({'; '.join(parts)}; {cost})"


def agreement(run: RunFiles, key: str, what: str, decimals: int) -> list[str]:
    """Screen mode: per method, the cells computed both ways and how the estimate of ``key``
    compares with the exact number there (Pearson r, sign agreement, largest error)."""
    if mode(run) != "screen":
        return []
    rows = []
    for name, ev in run.evals.items():
        est = (ev.get("estimate") or {}).get(key)
        if est is None:
            continue
        both = np.array(ev["confirmed"], dtype=bool)
        exact, estimated = matrix(ev[key])[both], matrix(est)[both]
        ok = ~(np.isnan(exact) | np.isnan(estimated))
        exact, estimated = exact[ok], estimated[ok]
        r = (float(np.corrcoef(exact, estimated)[0, 1])
             if len(exact) > 2 and exact.std() > 0 and estimated.std() > 0 else float("nan"))  # fmt: skip
        same_sign = float(np.mean(np.sign(exact) == np.sign(estimated))) if len(exact) else np.nan
        err = float(np.abs(exact - estimated).max()) if len(exact) else np.nan
        rows.append([name, str(len(exact)), fmt(r, 2), fmt(same_sign, 2), fmt(err, decimals)])
    if not rows:
        return []
    return ["## Estimate against exact", "",
            f"The cells screening computed exactly, where the {what} is known both ways "
            "(diagonal and most affected cells: not a random sample of cells).", ""] + table(
        ["method", "cells", "Pearson r", "same sign", "largest |error|"], rows)  # fmt: skip
