"""``OUT/report.md`` of an lm run (NLL matrices; see :mod:`culture_neurons.scoring.lm`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from culture_neurons.report.files import REPORT_FILE, RND, load_run, num, write_text
from culture_neurons.report.tables import table


def write_report(out_dir, description: str = "") -> Path:
    """``OUT/report.md`` of an lm run: full-model NLL, per-method self/cross/gap of the NLL
    change (most selective = largest gap first, against RND's mean +- sd), layer counts and
    every delta matrix. (The mc report reads accuracy and flip matrices, which an lm run does
    not have.)"""
    run = load_run(out_dir)
    evals = {m: run.evals[m] for m in run.methods}
    rnd, meta, stats, cfg = run.rnd, run.meta, run.stats, run.config
    first = next(iter(run.evals.values()))
    cultures = run.cultures
    lines = ["# Culture-sensitive neurons: ablation report (language modelling)", "",
             "## What was run", "", description.strip() or "(no description given)", ""]  # fmt: skip
    fp = run.fingerprint
    if fp:
        lines.append(f"- **Model**: `{fp.get('model_type')}`, {fp.get('num_layers')} decoder "
                     f"layers x {fp.get('num_neurons')} MLP neurons")  # fmt: skip
    lines += [
        f"- **Data**: {meta.get('data', '')}; {len(cultures)} cultures; evaluation sentences "
        f"per culture {first['items_per_culture']}, predicted tokens {first['tokens_per_culture']}",
        f"- **Identification**: every identification sentence ({stats.get('items_counted')} "
        "counted; a sentence has no right answer, so `identify_on` does not apply)",
        f"- **Selection**: ratio {cfg.get('ratio')}, activation `{cfg.get('activation')}`, scope "
        f"`{cfg.get('scope')}`, RND: {cfg.get('rnd_draws')} draws size-matched to "
        f"`{cfg.get('rnd_like')}`",
        "- **Metric**: mean next-token NLL per culture (nats/token, token-weighted); "
        "`delta[s][c'] = NLL_ablated - NLL_full` with row s the culture whose neurons were "
        "ablated: **positive = the ablation hurt**. self = mean diagonal, cross = mean "
        "off-diagonal, gap = self - cross: **a larger (more positive) gap = more selective**.",
        "", "## Full model", "",
    ]  # fmt: skip
    rows = [[c, _f(x, sign=False), _f(math.exp(x) if x is not None else None, 2, sign=False)]
            for c, x in zip(cultures, first["nll_full"], strict=True)]  # fmt: skip
    lines += table(["culture", "NLL (nats/token)", "perplexity"], rows) + ["", "## Summary", ""]
    ranked = sorted(evals, key=lambda m: -num(evals[m]["gap"]))
    rows = [[m, _f(evals[m]["self"]), _f(evals[m]["cross"]), _f(evals[m]["gap"]),
             _vs_rnd(evals[m]["gap"], rnd)] for m in ranked]  # fmt: skip
    if rnd is not None:
        rows.append([f"rnd ({len(rnd.get('draws', []))} draws)", _pm(rnd, "self"),
                     _pm(rnd, "cross"), _pm(rnd, "gap"), ""])  # fmt: skip
    lines += table(["method", "self", "cross", "gap", "gap above RND + 2 sd"], rows)
    lines += ["", "## Selected neurons per layer (summed over cultures)", ""]
    layer_rows = {**evals, **({"rnd (mean)": rnd} if rnd else {})}
    L = len(first["layer_counts"][0]) if first["layer_counts"] else 0
    rows = [[m, *(f"{x:g}" for x in _layer_totals(ev["layer_counts"]))]
            for m, ev in layer_rows.items()]  # fmt: skip
    lines += table(["method", *(f"L{i}" for i in range(L))], rows)
    for m, ev in {**evals, **({RND: rnd} if rnd else {})}.items():
        lines += ["", f"## {m}: NLL change (nats/token; row = ablated culture)", ""]
        lines += table(["ablated \\ evaluated", *cultures],
                       [[c, *(_f(x) for x in row)]
                        for c, row in zip(cultures, ev["delta"], strict=True)])  # fmt: skip
    return write_text(run.out / REPORT_FILE, "\n".join(lines) + "\n")


def _f(x, decimals: int = 4, sign: bool = True) -> str:
    """A number for the report, signed by default (deltas); ``n/a`` when undefined."""
    if x is None or x != x:
        return "n/a"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _pm(res: dict, key: str) -> str:
    return f"{_f(res.get(key))} +- {num(res.get(key + '_sd')):.4f}"


def _vs_rnd(gap, rnd: dict | None) -> str:
    if rnd is None or gap is None or rnd.get("gap") is None:
        return "n/a"
    return "yes" if gap > rnd["gap"] + 2 * num(rnd.get("gap_sd")) else "no"


def _layer_totals(counts) -> list[float]:
    return torch.tensor(counts, dtype=torch.float64).sum(0).tolist() if counts else []
