"""The report of a multiple-choice run (SPEC "What a run leaves behind"): ``OUT/report.md`` and
``OUT/figures/``.

It reads only files (``run.json``, ``stats.json``, ``eval/*.json``, ``masks/*.safetensors``), so
a report can be written again for any finished run without the model::

    OUT/figures/<method>_delta.png   delta [S, C] heatmap (not written when labels are hidden)
    OUT/figures/<method>_flip.png    flip  [S, C] heatmap
    OUT/figures/layers.png           selected neurons per layer, one line per method
    OUT/report.md                    what was run, every number with its interval, the RND
                                     controls, which method wins on which measure, figures

Row s of a matrix is the culture whose neurons were ablated (or steered), column c the culture
evaluated. Units: accuracy in percent, delta in points (``acc_changed - acc_full``), flip as a
fraction. ``self`` is the mean diagonal, ``cross`` the mean off-diagonal, ``gap = self - cross``
and ``specificity = self / (self + (C - 1) cross)`` (see :mod:`culture_neurons.scoring.metrics`).
Every method has its own RND control (random sets of its own sizes) and p-values against it.
Delta and flip heatmaps of all methods share one colour scale each.

With hidden labels (CVQA's public ``Label == -1``) no accuracy exists: the report says so at
the top and shows flip rates and agreement (``1 - flip``) only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from culture_neurons import eval_schema as schema
from culture_neurons.report import estimated, stability
from culture_neurons.report.conclusions import (
    CELLS_NOTE,
    HOLDS_ZERO_NOTE,
    LEVEL,
    Measure,
    beats_cell,
    cell_bold,
    headline_lines,
    holds_zero,
    primary_lines,
    ranked,
    rnd_cell,
    uncertainty_note,
    winner_line,
    with_ci,
)
from culture_neurons.report.figures import heatmap, layers_figure, shared_scale
from culture_neurons.report.files import (
    FIGURES_DIR,
    REPORT_FILE,
    RunFiles,
    load_run,
    matrix,
    write_text,
)
from culture_neurons.report.layers import TOP_LAYERS, layer_totals, overlap, top_layers
from culture_neurons.report.settings import settings_line, tokens_line
from culture_neurons.report.tables import fmt_count, fmt_flip, table

log = logging.getLogger(__name__)

HIDDEN_NOTICE = (
    "> **Labels are hidden in this data: accuracy is unavailable.** The evaluation items carry "
    "no answer key (CVQA's public `Label = -1`), so no accuracy and no accuracy change is "
    "computed anywhere in this report. Effects are measured against the full model's own "
    "answers instead: the **flip rate** is the share of items whose predicted letter changes, "
    "and **agreement** = 1 - flip."
)
GAP_READING = {"lower": "more negative = more selective",
               "higher": "more positive = more selective",
               "either": "either sign: amplified neurons may help or hurt, tested two-sided"}
CHANCE = 25.0  # accuracy of a uniform guess among the 4 options (percent)
# The report's rows of the eval JSON's measures (keys: culture_neurons.eval_schema).
DELTA = {k: Measure(schema.ACCURACY_DELTA.summary(k), label, schema.ACCURACY_DELTA.decimals,
                    " " + schema.ACCURACY_DELTA.unit) for k, label in (
    ("self", "self"), ("cross", "cross"), ("gap", "gap (self - cross)"))}  # fmt: skip
SPECIFICITY = Measure(schema.ACCURACY_DELTA.summary("specificity"),
                      "specificity (accuracy change)", 2)  # fmt: skip
FLIP = {k: Measure(schema.FLIP.summary(k), f"flip {label}", schema.FLIP.decimals)
        for k, label in (("self", "self"), ("cross", "cross"), ("gap", "gap (self - cross)"),
                         ("specificity", "specificity"))}  # fmt: skip


def write_report(out_dir: str | os.PathLike, description: str = "") -> Path:
    """Write ``OUT/figures/*.png`` and ``OUT/report.md`` for the run in ``out_dir``.

    Args:
        out_dir: a run's output dir holding at least ``eval/<method>.json``.
        description: what model and data these are, in the caller's words (first section).

    Returns:
        The path of ``report.md``.

    Raises:
        DataError: the run has no evaluation results yet, or they are malformed.
    """
    run = load_run(out_dir)
    figures = write_figures(run)
    path = write_text(run.out / REPORT_FILE, "\n".join(render(run, description, figures)) + "\n")
    log.info("report written to %s (%d methods, %d cultures)", path, len(run.evals),
             len(run.cultures))  # fmt: skip
    return path


def write_figures(run: RunFiles) -> dict[str, dict[str, str]]:
    """Every figure; returns ``{method: {"delta": rel_path, "flip": rel_path}, "layers": ...}``
    with paths relative to OUT (only the figures actually written). One colour scale for all
    delta figures and one for all flip figures, so colours compare across methods."""
    fig_dir = run.out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {m: {} for m in run.evals}
    kinds = [("flip", "flip rate (fraction of items whose answer changed)", False)]
    if run.labels:
        kinds.insert(0, ("delta", "accuracy change (points, changed - full)", True))
    else:  # a delta figure from an earlier run with labels would contradict this report
        for method in run.evals:
            (fig_dir / f"{method}_delta.png").unlink(missing_ok=True)
    for kind, label, diverging in kinds:
        mats = {m: matrix(ev[kind]) for m, ev in run.evals.items()}
        scale = shared_scale(list(mats.values()), diverging)
        for method, m in mats.items():
            path = fig_dir / f"{method}_{kind}.png"
            heatmap(path, m, run.cultures, _title(run, method, kind), label, scale, diverging,
                    _holds_zero_cells(run.evals[method].get(f"{kind}_ci")))  # fmt: skip
            written[method][kind] = f"{FIGURES_DIR}/{path.name}"
    layers_path = fig_dir / "layers.png"
    if layers_figure(run, layers_path):
        written["layers"] = {"layers": f"{FIGURES_DIR}/{layers_path.name}"}
    return written


def _holds_zero_cells(ci) -> np.ndarray | None:
    """[S, C] True where a cell's interval holds 0 (None without intervals)."""
    if not ci:
        return None
    return np.array([[holds_zero(c) is True for c in row] for row in ci], dtype=bool)


def _title(run: RunFiles, method: str, kind: str) -> str:
    ev = run.evals[method]
    m = schema.ACCURACY_DELTA if kind == schema.ACCURACY_DELTA.key else schema.FLIP
    unit = " " + m.unit if m is schema.ACCURACY_DELTA else ""
    what = "accuracy change" if m is schema.ACCURACY_DELTA else "flip rate"
    gap = with_ci(ev.get(m.summary()), ev.get(m.ci()), m.decimals, mark=False)
    return f"{method}: {what} ({_verb(ev)})\ngap {gap}{unit}; hatched: interval holds 0"


def _verb(ev: dict) -> str:
    return "ablated" if ev.get("intervention", "ablate") == "ablate" else (
        f"steered, alpha {ev.get('alpha'):g}")  # fmt: skip


def render(run: RunFiles, description: str, figures: dict[str, dict[str, str]]) -> list[str]:
    """The lines of ``report.md``."""
    lines = ["# Culture-sensitive neurons: " + ("ablation" if _ablation(run) else "steering")
             + " report", ""]  # fmt: skip
    if not run.labels:
        lines += [HIDDEN_NOTICE, ""]
    lines += estimated.notice(run)
    lines += _headline(run)
    key, what = ("delta", "accuracy change") if run.labels else ("flip", "flip rate")
    sections = (
        _what_was_run(run, description),
        _full_model(run),
        _primary(run),
        _summary(run),
        _winners(run),
        _layers(run, figures),
        _set_sizes(run),
        _overlap(run),
        stability.section(run),
        _matrices(run, figures),
        estimated.agreement(run, key, what, 3),
        _files(run),
    )
    for section in sections:
        lines += section + [""]
    return lines


def _ablation(run: RunFiles) -> bool:
    return run.first.get("intervention", "ablate") == "ablate"


def _what_was_run(run: RunFiles, description: str) -> list[str]:
    fp, st = run.fingerprint, run.stats
    lines = ["## What was run", "", description.strip() or "(no description given)", ""]
    if fp:
        lines.append(
            f"- **Model**: {fp.get('family')} (`{fp.get('model_type')}`), "
            f"{fp.get('num_layers')} decoder layers x {fp.get('num_neurons'):,} MLP neurons "
            f"(hidden size {fp.get('hidden_size')}, activation {fp.get('act_fn')}), "
            f"config hash `{str(fp.get('config_hash'))[:12]}`"
        )
    lines.append(f"- **Data**: {run.meta.get('data') or 'not recorded'}")
    lines.append("- **Settings**: " + settings_line(run))
    if (tokens := tokens_line(run)) is not None:
        lines.append("- **Tokens**: " + tokens)
    first = run.first
    ident, tokens = st.get("items"), st.get("tokens")
    n_eval = first.get("items_per_culture") or []
    lines += ["", f"{len(run.cultures)} culture(s); {sum(n_eval)} evaluation items in all. The "
              "run splits each culture's items: one part identifies the neurons (only the "
              "items counted below), the other is evaluated.", ""]  # fmt: skip
    rows = []
    for c, name in enumerate(run.cultures):
        rows.append([
            name,
            fmt_count(ident[c]) if ident else "n/a",
            fmt_count(tokens[c]) if tokens else "n/a",
            fmt_count(n_eval[c]) if n_eval else "n/a",
        ])  # fmt: skip
    lines += table(["culture", "identification items counted", "tokens counted", "evaluation items"],
                    rows)  # fmt: skip
    return lines


def _full_model(run: RunFiles) -> list[str]:
    """The headline accuracy (mean over cultures, with its interval), then per culture."""
    lines = ["## Full model", ""]
    first = run.first
    if not run.labels:
        lines.append("Accuracy is unavailable: the labels are hidden (see the notice at the top).")
    else:
        n = sum(first.get("items_per_culture") or [])
        mean = with_ci(first.get("accuracy_full_mean"), first.get("accuracy_full_mean_ci"), 1,
                       mark=False)  # fmt: skip
        lines += [
            f"**Headline: the unchanged model answers {mean} % of the evaluation items right** "
            f"(the mean of the {len(run.cultures)} cultures' accuracies on their {n} "
            f"evaluation items, which no identification step saw; chance is {CHANCE:.0f} % "
            "with 4 options; 95 % bootstrap interval over the items). Every delta below is "
            "measured from these per-culture accuracies.",
            "",
        ]
        rows = [[name, with_ci(a, ci, 1, mark=False)] for name, a, ci in zip(
            run.cultures, first["accuracy_full"], first.get("accuracy_full_ci") or
            [None] * len(run.cultures), strict=True)]  # fmt: skip
        lines += table(["culture", "full-model accuracy (%) [95 % interval]"], rows)
    unparseable = first.get("unparseable_full")
    if unparseable:  # only generation scoring can fail to give a letter
        lines += ["", f"The full model gave {unparseable} unparseable answer(s)."]
    return lines


def _headline(run: RunFiles) -> list[str]:
    """The report's first three lines (conclusions.headline_lines)."""
    first = run.first
    if run.labels:
        mean = with_ci(first.get("accuracy_full_mean"), first.get("accuracy_full_mean_ci"), 1,
                       mark=False)  # fmt: skip
        full = f"the full model answers {mean} % of the evaluation items right"
    else:
        full = "the labels are hidden, so the measure is the share of answers that flip"
    lines = headline_lines(run, DELTA["gap"] if run.labels else FLIP["gap"], full)
    return lines + [""] if lines else []


def _primary(run: RunFiles) -> list[str]:
    """The headline conclusions: the primary test of every method, adjusted."""
    lines = primary_lines(run, DELTA["gap"] if run.labels else FLIP["gap"])
    return ["## Primary result", "", *lines] if lines else []


def _summary(run: RunFiles) -> list[str]:
    """Summary tables with intervals, each method against its own RND control."""
    verb = "ablated" if _ablation(run) else f"steered (a := (1 + {run.first.get('alpha'):g}) a)"
    lines = ["## Effect per method", "",
             f"Each culture's selected neurons are {verb} and every culture is evaluated. "
             + uncertainty_note(run), "", HOLDS_ZERO_NOTE, ""]  # fmt: skip
    if run.labels:
        lines += [
            "### Accuracy change (points)", "",
            "**self** = mean change of the culture whose neurons were changed, **cross** = mean "
            "change of the other cultures, **gap** = self - cross ("
            + GAP_READING[DELTA["gap"].direction(run)] + "). RND: mean ± sd over the method's "
            "own draws.", "",
        ]  # fmt: skip
        rows = [[m, *(with_ci(run.evals[m].get(k), run.evals[m].get(schema.ci_of(k)), 1)
                               for k in ("self", "cross", "gap")),
                 rnd_cell(run.evals[m], "gap", 1), beats_cell(run.evals[m], "gap")]
                for m in ranked(run, DELTA["gap"])]  # fmt: skip
        lines += table(["method", "self", "cross", "gap", "RND gap", f"beats RND (p < {LEVEL})"],
                       rows) + [""]  # fmt: skip
        lines += _specificity_table(run, SPECIFICITY, "the accuracy lost")
    lines += [
        "### Flips (fraction of items whose answer changed)", "",
        "**flip self** / **flip cross** = share of the changed culture's / the other cultures' "
        "items whose answer changed; **flip gap** = self - cross (larger = more selective)"
        + ("; agreement = 1 - flip." if not run.labels else "."), "",
    ]  # fmt: skip
    rows = []
    for m in ranked(run, FLIP["gap"]):
        ev = run.evals[m]
        row = [m, *(with_ci(ev.get(FLIP[k].key), ev.get(schema.ci_of(FLIP[k].key)), 3)
                             for k in ("self", "cross", "gap"))]  # fmt: skip
        if not run.labels:
            own = ev.get(FLIP["self"].key)
            row += [fmt_flip(1 - own) if own is not None else "n/a"]
        rows.append(row + [rnd_cell(ev, FLIP["gap"].key, 3), beats_cell(ev, FLIP["gap"].key)])
    header = ["method", "flip self", "flip cross", "flip gap"]
    header += [] if run.labels else ["agreement self"]
    lines += table(header + ["RND flip gap", f"beats RND (p < {LEVEL})"], rows) + [""]
    lines += _specificity_table(run, FLIP["specificity"], "the flips")
    if len(run.cultures) == 1:
        lines += ["With one culture there is no off-diagonal: cross, gap and specificity are "
                  "undefined (n/a).", ""]  # fmt: skip
    return lines[:-1]


def _specificity_table(run: RunFiles, measure: Measure, of: str) -> list[str]:
    C = len(run.cultures)
    lines = [f"**{measure.label}** = the share of {of} (effects oriented as harm) that lands "
             f"on the culture whose neurons were changed: self / (self + (C - 1) cross), "
             f"clipped to [0, 1] (1 = all of it, 1/C = {1 / C:.2f} = spread evenly); unlike "
             "the gap it does not grow with the total damage. n/a where the total harm's "
             "interval holds 0 (nothing to share). Compared with the RND draws' shares where "
             "random sets do something, else with 1/C (the last column says which).",
             ""]  # fmt: skip
    rows = [[m, with_ci(run.evals[m].get(measure.key),
                                 run.evals[m].get(schema.ci_of(measure.key)), 2, mark=False),
             rnd_cell(run.evals[m], measure.key, 2), beats_cell(run.evals[m], measure.key)]
            for m in ranked(run, measure)]  # fmt: skip
    return lines + table(["method", "specificity", "RND specificity",
                          f"beats RND or 1/C (p < {LEVEL})"], rows) + [""]  # fmt: skip


def _winners(run: RunFiles) -> list[str]:
    """Which method is ahead on which measure, each with its paired interval and RND p."""
    lines = ["## Which method wins on which measure", "",
             "Ranked by the point value; the lead over the runner-up is a paired bootstrap "
             "difference (same resampled items for both methods), and a lead whose interval "
             "holds 0 is no lead.", ""]  # fmt: skip
    measures = ([DELTA["self"], DELTA["gap"], SPECIFICITY] if run.labels else []) + [
        FLIP["gap"], FLIP["specificity"]]  # fmt: skip
    for measure in measures:
        line = winner_line(run, measure)
        if line:
            lines.append(line)
    return lines


def _layers(run: RunFiles, figures: dict[str, dict[str, str]]) -> list[str]:
    lines = ["## Where the selected neurons sit", "",
             f"The {TOP_LAYERS} layers with most selected neurons (summed over cultures; layers "
             "numbered from 0).", ""]  # fmt: skip
    rows = []
    for method in run.evals:
        totals = layer_totals(run, method)
        top = ", ".join(f"layer {layer} ({fmt_count(n)})" for layer, n in top_layers(totals))
        rows.append([method, fmt_count(totals.sum()), top or "none selected"])
    lines += table(["method", "selected (sum over cultures)", "top layers (count)"], rows, "lrl")
    if "layers" in figures:
        lines += ["", f"![Selected neurons per layer]({figures['layers']['layers']})"]
    return lines


def _set_sizes(run: RunFiles) -> list[str]:
    lines = ["## Set sizes", "", "Neurons selected per culture (the set changed for it; each "
             "method's RND draws have exactly these sizes).", ""]  # fmt: skip
    rows = []
    for c, name in enumerate(run.cultures):
        rows.append([name] + [fmt_count(run.evals[m]["set_sizes"][c])
                              if run.evals[m].get("set_sizes") else "n/a"
                              for m in run.evals])  # fmt: skip
    lines += table(["culture", *run.evals], rows)
    options = [f"{m}: " + ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                    for k, v in sorted(run.evals[m]["options"].items())
                                    if k != "selection")  # the run's settings: listed above
               for m in run.evals if run.evals[m].get("options")]  # fmt: skip
    if options:
        lines += ["", "Selector options as the masks record them: " + "; ".join(options) + "."]
    return lines


def _overlap(run: RunFiles) -> list[str]:
    lines = ["## Overlap between methods", ""]
    result = overlap(run)
    if result is None:
        return lines + ["Not computed: fewer than two methods have masks in `masks/`."]
    names, j, chance = result
    lines += [
        "Mean Jaccard index |A ∩ B| / |A ∪ B| between the same culture's sets of two methods "
        "(0 = disjoint, 1 = identical). Last column: each method's mean Jaccard with its own "
        "RND draws, the overlap chance gives at its sizes.",
        "",
    ]
    rows = [[n] + ["-" if i == k else fmt_flip(j[i, k]) for k in range(len(names))]
            + [fmt_flip(chance[n]) if n in chance else "n/a"]
            for i, n in enumerate(names)]  # fmt: skip
    return lines + table(["", *names, "vs own RND"], rows)


def _matrices(run: RunFiles, figures: dict[str, dict[str, str]]) -> list[str]:
    lines = ["## Matrices", "",
             "Rows: the culture whose neurons are changed; columns: the culture evaluated; each "
             "cell with its 95 % interval. " + CELLS_NOTE + " In the figures (one colour "
             "scale per kind, shared by all methods) cells whose interval holds 0 are hatched; "
             "grey: no evaluation items."]  # fmt: skip
    kinds = [("flip", "flip rate", 3, False)]
    if run.labels:
        kinds = [("accuracy", "accuracy (%)", 1, False), ("delta", "accuracy change (points)",
                                                           1, True)] + kinds  # fmt: skip
    header = ["changed \\ evaluated", *run.cultures]
    for method, ev in run.evals.items():
        lines += ["", f"### {method}"]
        for kind, what, decimals, mark in kinds:
            lines += ["", f"{method}: {what}", ""]
            ci = ev.get(f"{kind}_ci") or [[None] * len(run.cultures)] * len(run.cultures)
            bold = (cell_bold(ev, kind) if mark else None) or [[False] * len(run.cultures)] * \
                len(run.cultures)
            rows = [[name, *(estimated.marked(with_ci(v, c, decimals, bold=b), e)
                             for v, c, b, e in zip(vals, cis, bolds, guessed, strict=True))]
                    for name, vals, cis, bolds, guessed in zip(
                        run.cultures, ev[kind], ci, bold, estimated.estimated_cells(ev),
                        strict=True)]  # fmt: skip
            lines += table(header, rows)
            if kind in figures.get(method, {}):
                lines += ["", f"![{method}: {what}]({figures[method][kind]})"]
    return lines


def _files(run: RunFiles) -> list[str]:
    """The files of the run, relative to OUT, each with what it holds."""
    described = [
        ("run.json", "settings, cultures, model fingerprint, data source"),
        ("stats.json", "statistics metadata: items and tokens counted per culture, versions"),
        ("stats.safetensors", "statistics T [C], K, S, Q [C, L, N]"),
        ("eval/full.json", "full-model predictions per evaluation item"),
    ]
    lines = ["## Files", ""]
    for name, what in described:
        if (run.out / name).is_file():
            lines.append(f"- `{name}`: {what}")
    masks = sorted((run.out / "masks").glob("*.safetensors"))
    methods = [p for p in masks if not p.stem.startswith("rnd-")]
    for p in methods:
        lines.append(f"- `masks/{p.name}`: selected (layer, neuron) pairs per culture")
    draws = len(masks) - len(methods)
    if draws:
        lines.append(f"- `masks/rnd-<methods>-<i>.safetensors`: {draws} RND draws, size-matched "
                     "to the methods named")  # fmt: skip
    for method in run.evals:
        lines.append(f"- `eval/{method}.json`: matrices, intervals, summaries, RND control and "
                     f"p-values of {method}")  # fmt: skip
    for p in sorted((run.out / FIGURES_DIR).glob("*.png")):
        lines.append(f"- `{FIGURES_DIR}/{p.name}`")
    lines.append(f"- `{REPORT_FILE}`: this report")
    return lines
