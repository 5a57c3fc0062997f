"""The report of a run (SPEC "What a run leaves behind"): ``OUT/report.md`` and ``OUT/figures/``.

It reads only files (``run.json``, ``stats.json``, ``eval/*.json``, ``masks/*.safetensors``), so
a report can be written again for any finished run without the model::

    OUT/figures/<method>_delta.png   delta [S, C] heatmap (not written when labels are hidden)
    OUT/figures/<method>_flip.png    flip  [S, C] heatmap
    OUT/figures/layers.png           selected neurons per layer, one line per method
    OUT/report.md                    what was run, tables, one computed interpretation, figures

Row s of a matrix is the culture whose neurons were ablated, column c the culture evaluated.
Units: accuracy in percent, delta in points (``acc_ablated - acc_full``), flip as a fraction.
``self`` is the mean diagonal, ``cross`` the mean off-diagonal, ``gap = self - cross``: a more
negative delta gap (a larger flip gap) means a more selective method. ``rnd`` is the control:
random sets of the same sizes, its summaries the mean and sd over its draws.

With hidden labels (CVQA's public ``Label == -1``) no accuracy exists: the report says so at
the top and shows flip rates and agreement (``1 - flip``) only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culture_neurons.report.figures import heatmap, layers_figure
from culture_neurons.report.files import (
    FIGURES_DIR,
    REPORT_FILE,
    RND,
    RunFiles,
    load_run,
    matrix,
    num,
    write_text,
)
from culture_neurons.report.layers import TOP_LAYERS, layer_totals, overlap, top_layers
from culture_neurons.report.tables import fmt_count, fmt_flip, fmt_points, table

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("self", "cross", "gap", "flip_self", "flip_cross", "flip_gap")
HIDDEN_NOTICE = (
    "> **Labels are hidden in this data: accuracy is unavailable.** The evaluation items carry "
    "no answer key (CVQA's public `Label = -1`), so no accuracy and no accuracy change is "
    "computed anywhere in this report. Ablation effects are measured against the full model's "
    "own answers instead: the **flip rate** is the share of items whose predicted letter "
    "changes, and **agreement** = 1 - flip."
)


@dataclass
class Measure:
    """What ranks methods: delta summaries with labels, flip summaries without."""

    prefix: str  # "" (delta, points) or "flip_"
    unit: str  # " points" after delta values; flips are bare fractions
    fmt: Callable[[object], str]  # fmt_points or fmt_flip
    lower_is_better: bool  # a more negative delta gap, but a larger flip gap, is more selective

    def key(self, name: str) -> str:
        return self.prefix + name


def measure_of(run: RunFiles) -> Measure:
    if run.labels:
        return Measure("", " points", fmt_points, lower_is_better=True)
    return Measure("flip_", "", fmt_flip, lower_is_better=False)


def ranking(run: RunFiles, measure: Measure) -> list[str]:
    """Every evaluated method (RND included), most selective first, undefined values last.

    Ranked by gap; with one culture (no off-diagonal, gap undefined) by self instead.
    """
    by = "gap" if len(run.cultures) > 1 else "self"
    sign = 1 if measure.lower_is_better else -1

    def key(method: str) -> tuple[bool, float]:
        v = num(run.evals[method].get(measure.key(by)))
        return (math.isnan(v), sign * v if not math.isnan(v) else 0.0)

    return sorted(run.evals, key=key)


def beats_rnd(run: RunFiles, method: str, measure: Measure) -> bool | None:
    """Whether ``method``'s gap is more selective than RND's mean by more than 2 RND sd.

    None where it cannot be said: no RND, fewer than two draws (sd unknown), undefined gap.
    """
    rnd, key = run.rnd, measure.key("gap")
    if rnd is None or len(rnd.get("draws", [])) < 2:
        return None
    gap, mean, sd = num(run.evals[method].get(key)), num(rnd.get(key)), num(rnd.get(key + "_sd"))
    if any(math.isnan(v) for v in (gap, mean, sd)):
        return None
    margin = mean - gap if measure.lower_is_better else gap - mean
    return margin > 2 * sd


def _summary_cell(ev: dict, key: str, fmt) -> str:
    """A summary value; RND's as mean ± sd over its draws."""
    text = fmt(ev.get(key))
    if ev.get("method") == RND and key + "_sd" in ev and text != "n/a":
        text += " ± " + fmt(ev[key + "_sd"]).lstrip("-")
    return text


def interpretation(run: RunFiles, measure: Measure) -> str:
    """One or two sentences read off the summary numbers (nothing asserted that is not computed)."""
    methods = [m for m in ranking(run, measure) if m != RND]
    if not methods:
        return "Only the RND control was evaluated; there is no selector to compare with it."
    what = "accuracy" if run.labels else "answers"
    if len(run.cultures) == 1:
        best, f = methods[0], measure.fmt
        effect = (f"changes that culture's accuracy by {f(run.evals[best].get('self'))} points"
                  if run.labels else
                  f"flips {f(run.evals[best].get('flip_self'))} of that culture's answers")  # fmt: skip
        return (
            "With one culture selectivity cannot be measured (no other culture to compare "
            f"with); ablating **{best}**'s set {effect}"
            + (", the largest effect of the methods." if len(methods) > 1 else ".")
        )
    best = methods[0]
    ev, f, k = run.evals[best], measure.fmt, measure.key
    gap = num(ev.get(k("gap")))
    if math.isnan(gap):
        return f"No method has a defined gap{_undefined_reason(run)}."
    selective = gap < 0 if measure.lower_is_better else gap > 0
    subject = (f"**{best}** is the most selective method" if len(methods) > 1
               else f"**{best}** is the only method evaluated")  # fmt: skip
    if not selective:
        lead = (
            f"No method changes a culture's own {what} more than the other cultures'; the best "
            "gap is "
            f"{f(gap)}{measure.unit} (**{best}**)."
        )
    elif run.labels:
        lead = (
            f"{subject}: ablating a culture's neurons changes its "
            f"own accuracy by {f(ev.get('self'))} points and the other cultures' by "
            f"{f(ev.get('cross'))} on average (gap {f(gap)} points)."
        )
    else:
        lead = (
            f"{subject}: ablating a culture's neurons flips "
            f"{f(ev.get('flip_self'))} of its own answers and {f(ev.get('flip_cross'))} of the "
            f"other cultures' on average (flip gap {f(gap)})."
        )
    return lead + " " + _versus_rnd(run, measure, best, methods)


def _undefined_reason(run: RunFiles) -> str:
    """Why summaries are NaN: the cultures without evaluation items, when there are any."""
    items = next(iter(run.evals.values())).get("items_per_culture") or []
    empty = [name for name, n in zip(run.cultures, items, strict=False) if not n]
    return f" (no evaluation items for {', '.join(empty)})" if empty else ""


def _versus_rnd(run: RunFiles, measure: Measure, best: str, methods: list[str]) -> str:
    """The sentence comparing the best method with the RND control, computed from the draws."""
    rnd, f, key = run.rnd, measure.fmt, measure.key("gap")
    if rnd is None:
        return "This run has no RND control, so the gap cannot be compared with chance."
    draws = len(rnd.get("draws", []))
    gap, mean = num(run.evals[best].get(key)), num(rnd.get(key))
    if draws < 2:
        return (
            f"RND has {draws} draw(s), so its spread is unknown: its gap is {f(mean)}"
            f"{measure.unit}, {f(abs(gap - mean))} from {best}'s."
        )
    sd = num(rnd.get(key + "_sd"))
    margin = abs(gap - mean)
    if beats_rnd(run, best, measure):
        text = (
            f"It beats RND (gap {f(mean)} ± {f(sd)} over {draws} draws) by {f(margin)}"
            f"{measure.unit}, more than 2 sd ({f(2 * sd)})."
        )
    else:
        text = (
            f"Its gap is within 2 sd ({f(2 * sd)}) of RND's ({f(mean)} ± {f(sd)} over {draws} "
            f"draws) or on the wrong side of it: not distinguishable from random sets of the "
            f"same size."
        )
    winners = [m for m in methods if beats_rnd(run, m, measure)]
    text += " Methods more selective than RND by more than 2 sd: " + (
        ", ".join(winners) + "." if winners else "none."
    )
    return text


def write_figures(run: RunFiles) -> dict[str, dict[str, str]]:
    """Every figure; returns ``{method: {"delta": rel_path, "flip": rel_path}, "layers": ...}``
    with paths relative to OUT (only the figures actually written)."""
    fig_dir = run.out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    for method, ev in run.evals.items():
        written[method] = {}
        delta_path = fig_dir / f"{method}_delta.png"
        if run.labels:
            heatmap(delta_path, matrix(ev["delta"]), run.cultures, _title(run, method, "delta"),
                     "accuracy change (points, ablated - full)", diverging=True)  # fmt: skip
            written[method]["delta"] = f"{FIGURES_DIR}/{delta_path.name}"
        else:
            # A delta figure from an earlier run with labels would contradict this report.
            delta_path.unlink(missing_ok=True)
        flip_path = fig_dir / f"{method}_flip.png"
        heatmap(flip_path, matrix(ev["flip"]), run.cultures, _title(run, method, "flip"),
                 "flip rate (fraction of items whose answer changed)", diverging=False)  # fmt: skip
        written[method]["flip"] = f"{FIGURES_DIR}/{flip_path.name}"
    layers_path = fig_dir / "layers.png"
    if layers_figure(run, layers_path):
        written["layers"] = {"layers": f"{FIGURES_DIR}/{layers_path.name}"}
    return written


def _title(run: RunFiles, method: str, kind: str) -> str:
    ev = run.evals[method]
    prefix, fmt, unit = ("", fmt_points, " points") if kind == "delta" else ("flip_", fmt_flip, "")
    name = method if method != RND else f"rnd (mean of {len(ev.get('draws', []))} draws)"
    what = "accuracy change" if kind == "delta" else "flip rate"
    values = ", ".join(
        f"{k} {_summary_cell(ev, prefix + k, fmt)}" for k in ("self", "cross", "gap")
    )
    return f"{name}: {what} after ablation\n{values}{unit}"


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


def render(run: RunFiles, description: str, figures: dict[str, dict[str, str]]) -> list[str]:
    """The lines of ``report.md``."""
    lines = ["# Culture-sensitive neurons: ablation report", ""]
    if not run.labels:
        lines += [HIDDEN_NOTICE, ""]
    sections = (
        _what_was_run(run, description),
        _full_model(run),
        _summary(run),
        _layers(run, figures),
        _set_sizes(run),
        _overlap(run),
        _matrices(run, figures),
        _files(run),
    )
    for section in sections:
        lines += section + [""]
    return lines


def _what_was_run(run: RunFiles, description: str) -> list[str]:
    fp, cfg, st = run.fingerprint, run.config, run.stats
    lines = ["## What was run", "", description.strip() or "(no description given)", ""]
    if fp:
        lines.append(
            f"- **Model**: {fp.get('family')} (`{fp.get('model_type')}`), "
            f"{fp.get('num_layers')} decoder layers x {fp.get('num_neurons'):,} MLP neurons "
            f"(hidden size {fp.get('hidden_size')}, activation {fp.get('act_fn')}), "
            f"config hash `{str(fp.get('config_hash'))[:12]}`"
        )
    lines.append(f"- **Data**: {run.meta.get('data') or 'not recorded'}")
    if cfg:
        per = "per layer" if cfg.get("per_layer") else "ranked across all layers"
        rnd = (f"{cfg.get('rnd_draws')} draws size-matched to {cfg.get('rnd_like')}"
               if cfg.get("rnd_draws") else "none")  # fmt: skip
        settings = [
            ("methods", ", ".join(cfg.get("methods", []))),
            ("ratio", f"{100 * cfg['ratio']:g}% of all neurons per culture ({per})"
             if "ratio" in cfg else "n/a"),
            ("RND control", rnd),
            ("activation", cfg.get("activation", st.get("activation"))),
            ("scope", cfg.get("scope", st.get("scope"))),
            ("identified on", _identify_on(cfg.get("identify_on"))),
            ("identification share", cfg.get("split_ratio")),
            ("scoring", cfg.get("scoring")),
            ("seed", cfg.get("seed")),
        ]  # fmt: skip
        lines.append("- **Settings**: " + "; ".join(f"{k} = {v}" for k, v in settings))
    else:
        lines.append("- **Settings**: not recorded (no run.json)")
    lines += ["", f"{len(run.cultures)} culture(s):", ""]
    first = next(iter(run.evals.values()))
    ident, tokens = st.get("items"), st.get("tokens")
    rows = []
    for c, name in enumerate(run.cultures):
        rows.append([
            name,
            fmt_count(ident[c]) if ident else "n/a",
            fmt_count(tokens[c]) if tokens else "n/a",
            fmt_count(first["items_per_culture"][c]) if "items_per_culture" in first else "n/a",
        ])  # fmt: skip
    lines += table(["culture", "identification items counted", "tokens counted", "evaluation items"],
                    rows)  # fmt: skip
    return lines


def _identify_on(value) -> str:
    return {"correct": "items the full model answers correctly", "all": "all items"}.get(
        value, str(value)
    )


def _full_model(run: RunFiles) -> list[str]:
    """Per-culture accuracy of the unablated model, or (hidden labels) why there is none."""
    lines = ["## Full model", ""]
    first = next(iter(run.evals.values()))
    if run.labels:
        acc = [num(v) for v in first["accuracy_full"]]
        rows = [[name, fmt_points(a)] for name, a in zip(run.cultures, acc, strict=True)]
        defined = [a for a in acc if not math.isnan(a)]
        if len(run.cultures) > 1:
            mean = np.mean(defined) if defined else None
            rows.append(["**mean of cultures**", fmt_points(mean)])
        lines += table(["culture", "full-model accuracy (%)"], rows)
    else:
        lines.append("Accuracy is unavailable: the labels are hidden (see the notice at the top).")
    unparseable = first.get("unparseable_full")
    if unparseable:  # only generation scoring can fail to give a letter
        lines += ["", f"The full model gave {unparseable} unparseable answer(s)."]
    return lines


def _summary(run: RunFiles) -> list[str]:
    """One row per method, most selective first, and the sentence that reads it."""
    measure = measure_of(run)
    lines = ["## Ablation effect per method", ""]
    if run.labels:
        lines.append(
            "Each culture's selected neurons are ablated and every culture is evaluated. "
            "**self** = mean accuracy change (points) of the culture whose neurons were ablated, "
            "**cross** = mean change of the other cultures, **gap** = self - cross (more "
            "negative = more selective). Flip = share of items whose answer changed (fraction)."
        )
        header = ["method", "self (pts)", "cross (pts)", "gap (pts)", "flip self", "flip cross",
                  "flip gap", "beats RND by > 2 sd"]  # fmt: skip
    else:
        lines.append(
            "Each culture's selected neurons are ablated and every culture is evaluated against "
            "the full model's answers. **flip self** = share of the ablated culture's items "
            "whose answer changed, **flip cross** = the same for the other cultures, "
            "**flip gap** = self - cross (larger = more selective); agreement = 1 - flip."
        )
        header = ["method", "flip self", "flip cross", "flip gap", "agreement self",
                  "agreement cross", "beats RND by > 2 sd"]  # fmt: skip
    if run.rnd is not None:
        lines.append(f"RND is shown as mean ± sd over its {len(run.rnd.get('draws', []))} draws.")
    lines.append("")
    rows = [_summary_row(run, m, measure) for m in ranking(run, measure)]
    lines += table(header, rows)
    if len(run.cultures) == 1:
        lines += ["", "With one culture there is no off-diagonal: cross and gap are undefined "
                  "(n/a)."]  # fmt: skip
    lines += ["", interpretation(run, measure)]
    per_draw = [measure.fmt(d.get(measure.key("gap"))) for d in (run.rnd or {}).get("draws", [])]
    if any(v != "n/a" for v in per_draw):  # a 1-culture run has no gap to list
        lines += ["", f"RND gap per draw: {', '.join(per_draw)}."]
    return lines


def _summary_row(run: RunFiles, method: str, measure: Measure) -> list[str]:
    ev = run.evals[method]
    beats = {True: "yes", False: "no", None: "-"}[beats_rnd(run, method, measure)]
    if method == RND:
        beats = "(control)"
    if run.labels:
        cells = [_summary_cell(ev, k, fmt_points) for k in ("self", "cross", "gap")]
        cells += [_summary_cell(ev, k, fmt_flip) for k in ("flip_self", "flip_cross", "flip_gap")]
    else:
        cells = [_summary_cell(ev, k, fmt_flip) for k in ("flip_self", "flip_cross", "flip_gap")]
        cells += [fmt_flip(1 - num(ev.get(k))) for k in ("flip_self", "flip_cross")]
    return [f"**{method}**" if method != RND else method, *cells, beats]


def _layers(run: RunFiles, figures: dict[str, dict[str, str]]) -> list[str]:
    lines = ["## Where the selected neurons sit", "",
             f"The {TOP_LAYERS} layers with most selected neurons (summed over cultures; layers "
             "numbered from 0; RND: mean over draws).", ""]  # fmt: skip
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
    lines = ["## Set sizes", "", "Neurons selected per culture (the set ablated for it).", ""]
    rows = []
    for c, name in enumerate(run.cultures):
        rows.append([name] + [fmt_count(run.evals[m]["set_sizes"][c])
                              if run.evals[m].get("set_sizes") else "n/a"
                              for m in run.evals])  # fmt: skip
    return lines + table(["culture", *run.evals], rows)


def _overlap(run: RunFiles) -> list[str]:
    lines = ["## Overlap between methods", ""]
    result = overlap(run)
    if result is None:
        return lines + ["Not computed: fewer than two methods have masks in `masks/`."]
    names, j = result
    lines += [
        "Mean Jaccard index |A ∩ B| / |A ∪ B| between the same culture's sets of two methods "
        "(0 = disjoint, 1 = identical; RND averaged over draws, so its column is the overlap "
        "expected by chance).",
        "",
    ]
    rows = [[n] + ["-" if i == k else fmt_flip(j[i, k]) for k in range(len(names))]
            for i, n in enumerate(names)]  # fmt: skip
    return lines + table(["", *names], rows)


def _matrices(run: RunFiles, figures: dict[str, dict[str, str]]) -> list[str]:
    lines = ["## Ablation matrices", "",
             "Rows: the culture whose neurons are ablated; columns: the culture evaluated. "
             "Grey cells: no evaluation items."]  # fmt: skip
    for method in run.evals:
        lines += ["", f"### {method}", ""]
        for kind, alt in (("delta", "accuracy change (points)"), ("flip", "flip rate")):
            if kind in figures.get(method, {}):
                lines.append(f"![{method}: {alt}]({figures[method][kind]})")
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
    for p in sorted((run.out / "masks").glob("*.safetensors")):
        lines.append(f"- `masks/{p.name}`: selected (layer, neuron) pairs per culture")
    for method in run.evals:
        lines.append(f"- `eval/{method}.json`: matrices and summaries of {method}")
    for p in sorted((run.out / FIGURES_DIR).glob("*.png")):
        lines.append(f"- `{FIGURES_DIR}/{p.name}`")
    lines.append(f"- `{REPORT_FILE}`: this report")
    return lines
