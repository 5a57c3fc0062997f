"""``culture-neurons compare RUN RUN ... --out DIR``: one report over finished runs.

It reads only files (``run.json``, ``stats.json``, ``eval/*.json``, ``masks/*.safetensors``;
no model is loaded) and writes::

    DIR/report.md                  the tables below, each with what it compares
    DIR/figures/depth.png          each method's selected neurons per layer on a normalised
                                   depth axis ((layer + 0.5) / L) as a density (the layer's
                                   share x L: 1 = even, whatever L), one line per run
    DIR/figures/depth_<method>.png the same per culture (the cultures the runs share)
    DIR/figures/effects.png        each run's primary gap and specificity with their 95 %
                                   intervals, one scale per measure

The sections: the runs; what differs between their settings (run.json); where the selected
neurons sit on the depth axis; each method's primary measure and specificity with intervals
and the run's own Holm-adjusted verdict against RND (nothing is recomputed); for runs of the
same model (equal fingerprints), the overlap of their selected sets per culture against what
random sets of the same sizes give (:mod:`culture_neurons.selection.stability`); each run's
split-half stability. Runs of different models, tasks or cultures are compared on what they
share; what cannot be compared is said in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np

from culture_neurons import eval_schema as schema
from culture_neurons.errors import CultureNeuronsError, UsageError
from culture_neurons.report.conclusions import LEVEL, fmt_p, with_ci
from culture_neurons.report.figures import new_figure
from culture_neurons.report.files import (
    FIGURES_DIR,
    REPORT_FILE,
    RunFiles,
    load_run,
    write_text,
)
from culture_neurons.report.layers import layer_counts, load_masks_for
from culture_neurons.report.stability import summary as stability_summary
from culture_neurons.report.tables import fmt, table
from culture_neurons.selection.stability import overlap

log = logging.getLogger(__name__)

OUTPUTS = (REPORT_FILE, FIGURES_DIR)  # what compare writes into DIR (replaced by --overwrite)
SHOWN = ("model", "data", "cultures")  # run.json inputs shown among the settings


def write_comparison(paths: list[str | os.PathLike], out: str | os.PathLike,
                     overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``out/report.md`` and ``out/figures/`` comparing the finished runs ``paths``;
    returns the report's path.

    Raises:
        UsageError: fewer than two runs, a run given twice, ``out`` one of the runs or
            already holding a comparison (without ``overwrite``), a folder that is no
            finished run (one line naming it and what to do).
    """
    runs = _load(paths)
    out = Path(out)
    _prepare_out(out, [r.out for r in runs.values()], overwrite)
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True)
    notes: list[str] = []
    lines = ["# Comparison of runs", "",
             f"{len(runs)} finished runs, compared on what they share. Every number comes "
             "from the runs' own files (nothing is recomputed but the random-set "
             "expectation of an overlap).", ""]  # fmt: skip
    for section in (_runs(runs), _settings(runs), _depth(runs, figures, notes),
                    _effects(runs, figures, notes), _overlaps(runs, notes), _stability(runs)):  # fmt: skip
        lines += section + [""]
    if notes:
        lines += ["## What could not be compared", "", *(f"- {n}" for n in notes), ""]
    path = write_text(out / REPORT_FILE, "\n".join(lines))
    log.info("comparison of %d runs written to %s", len(runs), path)
    return path


# -- inputs ---------------------------------------------------------------------------------
def _load(paths: list) -> dict[str, RunFiles]:
    """label -> the run's files; labels are the folders' names (made unique with parents)."""
    if len(paths) < 2:
        raise UsageError(f"compare needs at least two runs, got {len(paths)}; give the output "
                         "dirs of finished runs")  # fmt: skip
    folders = [Path(p) for p in paths]
    for i, f in enumerate(folders):
        if not f.is_dir():
            raise UsageError(f"{f} is not a folder; give the output dirs of finished runs")
        if any(f.resolve() == g.resolve() for g in folders[:i]):
            raise UsageError(f"run {f} is given twice; give each run once")
    labels = _labels(folders)
    runs = {}
    for label, f in zip(labels, folders, strict=True):
        try:
            runs[label] = load_run(f)
        except CultureNeuronsError as e:
            raise UsageError(f"{f} is not a finished run ({e}); give runs that were evaluated "
                             f"(culture-neurons evaluate --out {f})") from e  # fmt: skip
    return runs


def _labels(folders: list[Path]) -> list[str]:
    """Each run's name: its folder's, with as many parent folders as tell them apart."""
    for depth in range(1, 8):
        labels = ["/".join(f.resolve().parts[-depth:]) for f in folders]
        if len(set(labels)) == len(labels):
            return labels
    return [str(f.resolve()) for f in folders]


def _prepare_out(out: Path, runs: list[Path], overwrite: bool) -> None:
    """The project's rule for an output dir: results in it are replaced only with
    --overwrite; a run's own folder is never written into."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or of a comparison)")
    if any(out.resolve() == r.resolve() for r in runs):
        raise UsageError(f"--out {out} is one of the runs compared; give another folder")
    found = [n for n in OUTPUTS if (out / n).exists()]
    if found and not overwrite:
        raise UsageError(f"{out} already holds a comparison ({', '.join(found)}); pass "
                         "--overwrite to replace it, or give a new --out")  # fmt: skip
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -- what each run is -----------------------------------------------------------------------
def _model(run: RunFiles) -> str:
    fp = run.fingerprint
    return f"{fp.get('family', '?')} (`{fp.get('model_type', '?')}`)" if fp else "not recorded"


def _task(run: RunFiles) -> str:
    from culture_neurons.tasks import DEFAULT

    return run.config.get("task") or run.first.get("task") or DEFAULT


def _layers_of(run: RunFiles) -> int:
    fp = run.fingerprint
    if fp.get("num_layers"):
        return int(fp["num_layers"])
    counts = run.first.get("layer_counts")
    return len(counts[0]) if counts else 0


def _shared(runs: dict[str, RunFiles], what) -> list[str]:
    """The names every run has (``what(run)``), in the first run's order."""
    lists = [what(r) for r in runs.values()]
    return [x for x in lists[0] if all(x in other for other in lists[1:])]


def _runs(runs: dict[str, RunFiles]) -> list[str]:
    rows = []
    for label, r in runs.items():
        fp, m = r.fingerprint, schema.primary(r.first)
        rows.append([label, _model(r), f"{fp.get('num_layers', '?')} x {fp.get('num_neurons', '?')}",
                     _task(r), str(len(r.cultures)), ", ".join(r.methods),
                     m.label])  # fmt: skip
    return ["## Runs", ""] + table(["run", "model", "layers x neurons", "task", "cultures",
                                    "methods", "primary measure"], rows, "llllrll")  # fmt: skip


def _settings(runs: dict[str, RunFiles]) -> list[str]:
    """The settings (run.json's config, how model and data were given, the weights) that differ
    between the runs: what was varied."""
    values: dict[str, list] = {}
    for i, r in enumerate(runs.values()):
        found = {**r.config, **{k: r.meta.get("inputs", {}).get(k) for k in SHOWN},
                 "cultures": r.cultures,
                 "weights": str(r.fingerprint.get("weights_hash", ""))[:12] or None}  # fmt: skip
        for k, v in found.items():
            values.setdefault(k, [None] * len(runs))[i] = v
    differ = {k: v for k, v in values.items() if any(_show(x) != _show(v[0]) for x in v)}
    lines = ["## What differs between the runs", ""]
    if not differ:
        return lines + [f"Nothing: all {len(values)} settings recorded in run.json agree."]
    lines += [f"{len(differ)} of the {len(values)} settings recorded in the runs' run.json "
              "differ (the rest agree); `-`: not recorded by that run.", ""]  # fmt: skip
    rows = [[k, *(_show(x) for x in v)] for k, v in differ.items()]
    return lines + table(["setting", *runs], rows, "l" * (len(runs) + 1))


def _show(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        text = ",".join(map(str, v))
        return text if len(text) <= 60 else f"{len(v)} values: {text[:50]}..."
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# -- where the neurons sit ------------------------------------------------------------------
def _depth_density(counts: np.ndarray) -> np.ndarray:
    """Share of the selected neurons per unit of normalised depth in each layer: the layer's
    share x L, [L] (1 everywhere = spread evenly; a model's depth does not change the scale);
    NaN if none is selected."""
    total = counts.sum()
    return counts * len(counts) / total if total > 0 else np.full(counts.shape, np.nan)


def _mean_depth(counts: np.ndarray) -> float:
    """Mean normalised depth (l + 0.5) / L of the selected neurons (0 = first layer's start,
    1 = last layer's end); NaN when none is selected."""
    L = len(counts)
    total = counts.sum()
    return float((counts * (np.arange(L) + 0.5) / L).sum() / total) if total > 0 else float("nan")


def _depth(runs: dict[str, RunFiles], figures: Path, notes: list[str]) -> list[str]:
    methods = _union([r.methods for r in runs.values()])
    cultures = _shared(runs, lambda r: r.cultures)
    counts = {(label, m): layer_counts(r, m) for label, r in runs.items() for m in r.methods}
    for (label, m), c in counts.items():
        if c is None:
            notes.append(f"{label}: no layer counts for {m} (neither eval/{m}.json nor "
                         f"masks/{m}.safetensors holds them): left out of the depth profile")  # fmt: skip
    counts = {k: v for k, v in counts.items() if v is not None}
    lines = ["## Where the selected neurons sit, on a normalised depth axis", "",
             "Layer l of a model with L decoder layers sits at depth (l + 0.5) / L (0 = the "
             "first layer's input side, 1 = the last layer's output), so models of different "
             "depth line up; the figures plot each layer's share of the set times L (the "
             "density over depth: 1 = spread evenly, whatever L). **Mean depth**: the selected "
             "neurons' average depth (summed over cultures); **top layer**: where most of them "
             "sit, as layer / L.", ""]  # fmt: skip
    rows = []
    for label, r in runs.items():
        for m in r.methods:
            if (label, m) not in counts:
                continue
            per_layer = counts[label, m].sum(0)
            top = int(np.argmax(per_layer)) if per_layer.sum() > 0 else None
            rows.append([label, m, fmt(_mean_depth(per_layer), 2),
                         "none selected" if top is None else
                         f"{top} / {len(per_layer)} ({(top + 0.5) / len(per_layer):.2f}, "
                         f"{per_layer[top] / per_layer.sum():.0%} of the set)"])  # fmt: skip
    lines += table(["run", "method", "mean depth", "top layer (depth, share)"], rows, "llrl")
    if _depth_figure(figures / "depth.png", runs, methods, counts):
        lines += ["", f"![Selected neurons per normalised depth]({FIGURES_DIR}/depth.png)"]
    if not cultures:
        notes.append("the runs share no culture: the depth profile per culture is not compared")
        return lines
    for label, r in runs.items():
        left = [c for c in r.cultures if c not in cultures]
        if left:
            notes.append(f"{label}: {len(left)} culture(s) not in every run ({_show(left)}) are "
                         "left out of the per-culture comparisons")  # fmt: skip
    lines += ["", "### Per culture", "",
              f"Mean depth of each culture's set, for the {len(cultures)} culture(s) every run "
              "has.", ""]  # fmt: skip
    for m in methods:
        having = [label for label in runs if (label, m) in counts]
        if not having:
            continue
        rows = [[c, *(fmt(_mean_depth(counts[label, m][runs[label].cultures.index(c)]), 2)
                      for label in having)] for c in cultures]  # fmt: skip
        lines += [f"{m}:", ""] + table(["culture", *having], rows) + [""]
        name = f"depth_{m}.png"
        if _culture_figure(figures / name, runs, m, cultures, counts):
            lines += [f"![{m}: depth per culture]({FIGURES_DIR}/{name})", ""]
    return lines[:-1]


def _union(lists: list[list[str]]) -> list[str]:
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


def _depth_figure(path: Path, runs, methods, counts) -> bool:
    if not counts:
        return False
    fig = new_figure(4.2 * len(methods), 3.4)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    for ax, m in zip(axes, methods, strict=True):
        for label in runs:
            if (label, m) in counts:
                _plot_profile(ax, counts[label, m].sum(0), label)
        ax.set_title(m)
        ax.set_xlabel("normalised depth (layer + 0.5) / L")
        ax.set_xlim(0, 1)
    axes[0].set_ylabel("density (layer's share x L; 1 = even)")
    axes[-1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def _plot_profile(ax, per_layer: np.ndarray, label: str) -> None:
    L = len(per_layer)
    ax.plot((np.arange(L) + 0.5) / L, _depth_density(per_layer), marker="o", markersize=3,
            label=label)  # fmt: skip


def _culture_figure(path: Path, runs, method: str, cultures: list[str], counts) -> bool:
    having = [label for label in runs if (label, method) in counts]
    if not having:
        return False
    cols = min(5, len(cultures))
    rows = -(-len(cultures) // cols)
    fig = new_figure(2.6 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, c in zip(axes, cultures, strict=False):
        for label in having:
            _plot_profile(ax, counts[label, method][runs[label].cultures.index(c)], label)
        ax.set_title(c, fontsize=8)
        ax.set_xlim(0, 1)
    for ax in axes[len(cultures):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{method}: density of each culture's set over normalised depth (layer's "
                 "share x L; 1 = even)", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=100)
    return True


# -- effects --------------------------------------------------------------------------------
def _effects(runs: dict[str, RunFiles], figures: Path, notes: list[str]) -> list[str]:
    lines = ["## Primary measure and specificity, run by run", "",
             "Each run's primary measure (its gap: own culture's change minus the others') and "
             "specificity, with 95 % bootstrap intervals, as the run computed them. "
             f"**Verdict**: the run's primary test against its own size-matched RND draws, "
             f"Holm-adjusted across that run's methods (beats RND where adjusted p < {LEVEL}); "
             "the specificity's p is secondary (unadjusted). Runs of different measures "
             "(units) are not comparable on the gap: the figure gives each measure its own "
             "scale. `~`: the run estimated its matrix to first order (`--matrix estimate` or "
             "`screen`).", ""]  # fmt: skip
    rows, points = [], []
    for label, r in runs.items():
        for m in r.methods:
            ev = r.evals[m]
            meas = schema.primary(ev)
            gap, gap_ci = ev.get(meas.summary("gap")), ev.get(meas.ci("gap"))
            spec, spec_ci = ev.get(meas.summary("specificity")), ev.get(meas.ci("specificity"))
            q = ev.get(meas.p_adjusted("gap"))
            verdict = "n/a" if q is None else (
                f"{'beats RND' if q < LEVEL else 'does not beat RND'} (adjusted p = "
                f"{fmt_p(q, None)})")  # fmt: skip
            guess = "~" if ev.get("matrix", "exact") != "exact" else ""  # as the run marks it
            rows.append([label, m, f"{guess}{with_ci(gap, gap_ci, meas.decimals, mark=False)} "
                         f"{meas.unit.split(' (')[0]}", verdict,
                         with_ci(spec, spec_ci, 2, mark=False),
                         fmt_p(ev.get(meas.p("specificity")), None)])  # fmt: skip
            points.append((f"{label} · {m}", meas, gap, gap_ci, spec, spec_ci))
    lines += table(["run", "method", "gap [95 % interval]", "verdict (primary, adjusted)",
                    "specificity [95 %]", "specificity p (secondary)"], rows, "llrlrr")  # fmt: skip
    if len({p[1].name for p in points}) > 1:
        notes.append("the runs' primary measures differ (" + ", ".join(sorted(
            {p[1].label for p in points})) + "): their gaps are shown on separate scales")  # fmt: skip
    if _effects_figure(figures / "effects.png", points):
        lines += ["", f"![Primary gap and specificity per run and method]({FIGURES_DIR}/effects.png)"]
    return lines


def _effects_figure(path: Path, points) -> bool:
    measures = _union([[p[1].name] for p in points])
    panels = [(name, "gap") for name in measures] + [(None, "specificity")]
    fig = new_figure(4.0 * len(panels), 0.35 * len(points) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    y = np.arange(len(points))[::-1]
    for ax, (name, kind) in zip(axes, panels, strict=True):
        for yi, (_, meas, gap, gap_ci, spec, spec_ci) in zip(y, points, strict=True):
            if name is not None and meas.name != name:
                continue
            x, ci = (gap, gap_ci) if kind == "gap" else (spec, spec_ci)
            if x is None:
                continue
            err = None if not ci or None in ci else [[x - ci[0]], [ci[1] - x]]
            ax.errorbar([x], [yi], xerr=err, fmt="o", color="C0", capsize=3)
        ax.axvline(0, color="grey", linewidth=0.6)
        if kind == "gap":
            meas = next(p[1] for p in points if p[1].name == name)
            ax.set_title(f"gap: {meas.label}", fontsize=9)
            ax.set_xlabel(meas.unit, fontsize=8)
        else:
            ax.set_title("specificity (share of the effect on its own culture)", fontsize=9)
            ax.set_xlim(-0.05, 1.05)
    axes[0].set_yticks(y, labels=[p[0] for p in points], fontsize=8)
    fig.savefig(path, dpi=110)
    return True


# -- set overlap between runs of one model --------------------------------------------------
def _same_model(a: RunFiles, b: RunFiles) -> bool:
    fa, fb = a.fingerprint, b.fingerprint
    return bool(fa) and fa == fb and bool(fa.get("weights_hash"))


def _overlaps(runs: dict[str, RunFiles], notes: list[str]) -> list[str]:
    lines = ["## Same model: overlap of the selected sets between runs", "",
             "For runs of one model (equal fingerprints: architecture and weights), per culture "
             "and method: **J** = Jaccard index of the two runs' sets, **E[J]** = what two "
             "independent uniform random sets of the same sizes give (exact hypergeometric "
             "expectation; pool: all L x N neurons, or each layer's N where both runs select "
             "per layer).", ""]  # fmt: skip
    pairs = [(a, b) for a, b in combinations(runs, 2) if _same_model(runs[a], runs[b])]
    if not pairs:
        return lines + ["No two runs share a model (fingerprint): neurons of different models do "
                        "not correspond, so their sets are not compared."]  # fmt: skip
    for a, b in pairs:
        ra, rb = runs[a], runs[b]
        cultures = [c for c in ra.cultures if c in rb.cultures]
        methods = [m for m in ra.methods if m in rb.methods]
        if not cultures or not methods:
            notes.append(f"{a} and {b} share the model but no " + (
                "culture" if not cultures else "method") + ": their sets are not compared")  # fmt: skip
            continue
        found = {}
        for m in methods:
            ma, mb = load_masks_for(ra, m), load_masks_for(rb, m)
            if ma is None or mb is None:
                notes.append(f"masks/{m}.safetensors is missing from {a if ma is None else b}: "
                             f"{m}'s overlap between {a} and {b} is not computed")  # fmt: skip
                continue
            per_layer = bool(ra.config.get("per_layer")) and bool(rb.config.get("per_layer"))
            found[m] = overlap(ma, mb, per_layer=per_layer, names=cultures)
        if not found:
            continue
        lines += [f"### {a} vs {b}", ""]
        rows = [[c, *(f"{fmt(o['jaccard'][i], 3)} ({fmt(o['expected'][i], 3)})"
                      for o in found.values())] for i, c in enumerate(cultures)]  # fmt: skip
        rows.append(["**mean**", *(f"**{fmt(o['mean'], 3)}** ({fmt(o['expected_mean'], 3)})"
                                   for o in found.values())])  # fmt: skip
        lines += table(["culture", *(f"{m} J (E[J])" for m in found)], rows) + [""]
    return lines[:-1] if lines[-1] == "" else lines


# -- split-half stability -------------------------------------------------------------------
def _stability(runs: dict[str, RunFiles]) -> list[str]:
    lines = ["## Split-half stability of each run", "",
             "Within each run: the mean over cultures of the Jaccard index between the sets "
             "selected on two fixed halves of its identification items (J), and what random "
             "sets of the same sizes give (E[J]); see each run's report for the cultures.", ""]  # fmt: skip
    methods = _union([r.methods for r in runs.values()])
    rows = []
    for label, r in runs.items():
        cells = []
        for m in methods:
            got = stability_summary(r.evals[m]) if m in r.evals else None
            if m not in r.evals:
                cells.append("-")
            elif got is None:
                why = (r.evals[m].get("stability") or {}).get("unavailable")
                cells.append("not recorded" if why is None else "n/a")
            else:
                cells.append(f"{fmt(got[0], 3)} ({fmt(got[1], 3)})")
        rows.append([label, *cells])
    return lines + table(["run", *(f"{m} J (E[J])" for m in methods)], rows)
