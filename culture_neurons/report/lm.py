"""``OUT/report.md`` of an lm run (NLL matrices; see :mod:`culture_neurons.scoring.lm`): every
number with its 95 % paired-bootstrap interval, each method against its own size-matched RND
control, and which method wins on which measure (see :mod:`.conclusions`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from culture_neurons.eval_schema import NLL_DELTA, ci_of
from culture_neurons.report import estimated, stability
from culture_neurons.report.conclusions import (
    CELLS_NOTE,
    HOLDS_ZERO_NOTE,
    LEVEL,
    Measure,
    beats_cell,
    cell_bold,
    headline_lines,
    primary_lines,
    ranked,
    rnd_cell,
    uncertainty_note,
    winner_line,
    with_ci,
)
from culture_neurons.report.files import REPORT_FILE, load_run, write_text
from culture_neurons.report.settings import settings_line
from culture_neurons.report.tables import table

DECIMALS = NLL_DELTA.decimals  # nats/token
# The report's rows of the eval JSON's measure (keys: culture_neurons.eval_schema).
MEASURES = {k: Measure(NLL_DELTA.summary(k), label, DECIMALS, " nats/token") for k, label in (
    ("self", "self"), ("cross", "cross"), ("gap", "gap (self - cross)"))}  # fmt: skip
SPECIFICITY = Measure(NLL_DELTA.summary("specificity"), "specificity", 2)


def write_report(out_dir, description: str = "") -> Path:
    """``OUT/report.md`` of an lm run: full-model NLL, per-method self/cross/gap and specificity
    of the NLL change with intervals against the method's RND control, which method wins on
    which measure, layer counts and every delta matrix with intervals. (The mc report reads
    accuracy and flip matrices, which an lm run does not have.)"""
    run = load_run(out_dir)
    first, stats, cultures = run.first, run.stats, run.cultures
    steer = first.get("intervention", "ablate") != "ablate"
    lines = ["# Culture-sensitive neurons: " + ("steering" if steer else "ablation")
             + " report (language modelling)", "", *estimated.notice(run), *_headline(run),
             "## What was run", "",
             description.strip() or "(no description given)", ""]  # fmt: skip
    fp = run.fingerprint
    if fp:
        lines.append(f"- **Model**: `{fp.get('model_type')}`, {fp.get('num_layers')} decoder "
                     f"layers x {fp.get('num_neurons')} MLP neurons")  # fmt: skip
    lines += [
        f"- **Data**: {run.meta.get('data', '')}; {len(cultures)} cultures; evaluation "
        f"sentences per culture {first['items_per_culture']}, predicted tokens "
        f"{first['tokens_per_culture']}",
        f"- **Identification**: every identification sentence ({stats.get('items_counted')} "
        "counted; a sentence has no right answer, so `identify_on` does not apply)",
        "- **Settings**: " + settings_line(run),
        "- **Metric**: mean next-token NLL per culture (nats/token, token-weighted); "
        "`delta[s][c'] = NLL_changed - NLL_full` with row s the culture whose neurons were "
        "changed: **positive = hurt**. self = mean diagonal, cross = mean off-diagonal, gap = "
        "self - cross (" + ("either sign, tested two-sided" if steer else
                            "**a larger gap = more selective**") + "), specificity = self / "
        "(self + (C - 1) cross) on the NLL change oriented as harm, clipped to [0, 1]: the "
        "share of the summed harm landing on the changed culture (unlike the gap, it does not "
        "grow with the total damage; n/a where the total harm's interval holds 0).",
        "", uncertainty_note(run), "", HOLDS_ZERO_NOTE, "", "## Full model", "",
    ]  # fmt: skip
    mean = with_ci(first.get("nll_full_mean"), first.get("nll_full_mean_ci"), DECIMALS,
                   mark=False)  # fmt: skip
    lines += [f"Mean over cultures: {mean} nats/token (95 % bootstrap interval over sentences).",
              ""]  # fmt: skip
    ci = first.get("nll_full_ci") or [None] * len(cultures)
    rows = [[c, with_ci(x, i, DECIMALS, mark=False),
             f"{math.exp(x):.2f}" if x is not None else "n/a"]
            for c, x, i in zip(cultures, first["nll_full"], ci, strict=True)]  # fmt: skip
    lines += table(["culture", "NLL (nats/token)", "perplexity"], rows)
    primary = primary_lines(run, MEASURES["gap"])
    lines += (["", "## Primary result", "", *primary] if primary else []) + ["", "## Summary", ""]
    gap, spec = MEASURES["gap"].key, SPECIFICITY.key
    rows = [[m, *(with_ci(run.evals[m].get(MEASURES[k].key),
                          run.evals[m].get(ci_of(MEASURES[k].key)), DECIMALS)
                  for k in ("self", "cross", "gap")),
             rnd_cell(run.evals[m], gap, DECIMALS), beats_cell(run.evals[m], gap),
             with_ci(run.evals[m].get(spec), run.evals[m].get(ci_of(spec)), 2, mark=False),
             rnd_cell(run.evals[m], spec, 2), beats_cell(run.evals[m], spec)]
            for m in ranked(run, MEASURES["gap"])]  # fmt: skip
    lines += table(["method", "self", "cross", "gap", "RND gap", f"gap beats RND (p < {LEVEL})",
                    "specificity", "RND specificity",
                    f"specificity beats RND or 1/C (p < {LEVEL})"],
                   rows)  # fmt: skip
    lines += ["", "## Which method wins on which measure", "",
              "Lead over the runner-up: paired bootstrap difference (same resampled sentences); "
              "a lead whose interval holds 0 is no lead.", ""]  # fmt: skip
    for measure in (MEASURES["self"], MEASURES["gap"], SPECIFICITY):
        line = winner_line(run, measure)
        if line:
            lines.append(line)
    lines += ["", "## Selected neurons per layer (summed over cultures)", ""]
    L = len(first["layer_counts"][0]) if first["layer_counts"] else 0
    rows = [[m, *(f"{x:g}" for x in _layer_totals(ev["layer_counts"]))]
            for m, ev in run.evals.items()]  # fmt: skip
    lines += table(["method", *(f"L{i}" for i in range(L))], rows)
    lines += [""] + stability.section(run)
    for m, ev in run.evals.items():
        lines += ["", f"## {m}: NLL change (nats/token; row = changed culture)", ""]
        ci = ev.get("delta_ci") or [[None] * len(cultures)] * len(cultures)
        bold = cell_bold(ev, "delta") or [[False] * len(cultures)] * len(cultures)
        lines += [CELLS_NOTE, ""]
        lines += table(["changed \\ evaluated", *cultures],
                       [[c, *(estimated.marked(with_ci(x, i, DECIMALS, bold=b), e)
                              for x, i, b, e in zip(row, cis, bolds, guessed, strict=True))]
                        for c, row, cis, bolds, guessed in zip(
                            cultures, ev["delta"], ci, bold, estimated.estimated_cells(ev),
                            strict=True)])  # fmt: skip
    lines += [""] + estimated.agreement(run, "delta", "NLL change", DECIMALS)
    return write_text(run.out / REPORT_FILE, "\n".join(lines) + "\n")


def _layer_totals(counts) -> list[float]:
    return torch.tensor(counts, dtype=torch.float64).sum(0).tolist() if counts else []


def _headline(run) -> list[str]:
    """The report's first three lines (conclusions.headline_lines)."""
    first = run.first
    mean = with_ci(first.get("nll_full_mean"), first.get("nll_full_mean_ci"), DECIMALS,
                   mark=False)  # fmt: skip
    lines = headline_lines(run, MEASURES["gap"], f"the full model's NLL is {mean} nats/token")
    return lines + [""] if lines else []
