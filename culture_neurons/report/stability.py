"""The report's split-half stability section: from each method's eval JSON ``stability``
(:mod:`culture_neurons.pipeline.halves`), the Jaccard of the sets selected on the two halves
of the identification items against its expectation for random sets of the same sizes."""

from __future__ import annotations

from culture_neurons.report.files import RunFiles
from culture_neurons.report.tables import fmt, table

DECIMALS = 3
READING = (
    "Each method is selected again on each of two fixed halves of the identification items "
    "(split by a hash of the item id, recorded in the same forwards). Per culture, **J** is the "
    "Jaccard index of the two halves' sets (1 = the same neurons, 0 = disjoint) and **E[J]** "
    "what two independent uniform random sets of the same sizes from the same pool give "
    "(exact, from the hypergeometric law of their intersection). J far above E[J] means the "
    "selection is a property of the model rather than of the items it saw; each half has half "
    "the items, so J understates the stability of the whole run's selection. n/a: both "
    "halves selected nothing for that culture."
)


def summary(ev: dict) -> tuple[float | None, float | None] | None:
    """(mean J, mean E[J]) over cultures of eval JSON ``ev``; None without stability."""
    st = ev.get("stability")
    if not st or "unavailable" in st:
        return None
    return st.get("mean"), st.get("expected_mean")


def section(run: RunFiles) -> list[str]:
    """``## Split-half stability``: the run-level summary per method, then per culture."""
    lines = ["## Split-half stability", ""]
    found = {m: ev["stability"] for m, ev in run.evals.items() if ev.get("stability")}
    if not found:
        return lines + ["Not recorded: the statistics were recorded without halves (`--no-halves`"
                        ", or by an older version); record again to get it."]  # fmt: skip
    lines += [READING, ""]
    rows = []
    for m, st in found.items():
        if "unavailable" in st:
            rows.append([m, "n/a", "n/a", "n/a", st["unavailable"]])
            continue
        mean, expected = st.get("mean"), st.get("expected_mean")
        ratio = mean / expected if mean is not None and expected else None
        rows.append([m, fmt(mean, DECIMALS), fmt(expected, DECIMALS),
                     fmt(ratio, 1) if ratio is not None else "n/a",
                     f"pool {st.get('pool')}"])  # fmt: skip
    lines += table(["method", "mean J", "mean E[J] (random)", "J / E[J]", "note"], rows,
                   "lrrrl") + [""]  # fmt: skip
    usable = {m: st for m, st in found.items() if "unavailable" not in st}
    if usable:
        names = next(iter(usable.values()))["names"]
        items = next(iter(usable.values())).get("items") or [[None, None]] * len(names)
        header = ["culture", "items (half 0 / 1)", *(f"{m} J (E[J])" for m in usable)]
        rows = [[name, f"{items[c][0]} / {items[c][1]}",
                 *(f"{fmt(st['jaccard'][c], DECIMALS)} ({fmt(st['expected'][c], DECIMALS)})"
                   for st in usable.values())] for c, name in enumerate(names)]  # fmt: skip
        lines += table(header, rows)
    return lines
