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

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .masks import Masks, load_masks

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
RND = "rnd"
SUMMARY_KEYS = ("self", "cross", "gap", "flip_self", "flip_cross", "flip_gap")
TOP_LAYERS = 3
ANNOTATE_MAX_CULTURES = 10  # write values into heatmap cells up to this many cultures
HIDDEN_NOTICE = (
    "> **Labels are hidden in this data: accuracy is unavailable.** The evaluation items carry "
    "no answer key (CVQA's public `Label = -1`), so no accuracy and no accuracy change is "
    "computed anywhere in this report. Ablation effects are measured against the full model's "
    "own answers instead: the **flip rate** is the share of items whose predicted letter "
    "changes, and **agreement** = 1 - flip."
)


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class RunFiles:
    """What a run left in ``out`` (see the module docstring); only ``evals`` is required."""

    out: Path
    meta: dict  # run.json: config, cultures, fingerprint, data ({} if absent)
    stats: dict  # stats.json: fingerprint, items, tokens, ... ({} if absent)
    evals: dict[str, dict]  # method -> eval/<method>.json, run order, "rnd" last
    cultures: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.cultures = list(next(iter(self.evals.values()))["cultures"])
        for name, ev in self.evals.items():
            if list(ev["cultures"]) != self.cultures:
                raise DataError(
                    f"eval/{name}.json is for cultures {ev['cultures']}, the other results for "
                    f"{self.cultures}; evaluate all methods of one run into one output dir"
                )

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def labels(self) -> bool:
        """True only if every result was computed with labels (any hidden: no accuracy)."""
        return all(ev.get("labels_available") and ev.get("delta") is not None
                   for ev in self.evals.values())  # fmt: skip

    @property
    def methods(self) -> list[str]:
        """The selectors evaluated, without the RND control."""
        return [m for m in self.evals if m != RND]

    @property
    def rnd(self) -> dict | None:
        return self.evals.get(RND)

    @property
    def fingerprint(self) -> dict:
        return self.stats.get("fingerprint") or self.meta.get("fingerprint") or {}


def load_run(out_dir: str | os.PathLike) -> RunFiles:
    """Read the JSON files of a run in ``out_dir``.

    Raises:
        DataError: no ``eval/<method>.json`` (the run has not been evaluated), or a file
            that is not JSON, or results for different cultures.
    """
    out = Path(out_dir)
    eval_dir = out / "eval"
    found = sorted(p.stem for p in eval_dir.glob("*.json") if p.stem != "full")
    if not found:
        raise DataError(f"no evaluation results in {eval_dir}; run `evaluate` before the report")
    meta, stats = _read_json(out / "run.json", {}), _read_json(out / "stats.json", {})
    # The run's method order first (as configured), anything else after it, the control last.
    configured = [m for m in meta.get("config", {}).get("methods", []) if m in found]
    order = configured + [m for m in found if m not in configured and m != RND]
    if RND in found:
        order.append(RND)
    evals = {m: _read_json(eval_dir / f"{m}.json") for m in order}
    return RunFiles(out, meta, stats, evals)


def _read_json(path: Path, default: dict | None = None) -> dict:
    """A JSON file (``NaN`` literals allowed: summaries of a 1-culture run hold them)."""
    if not path.is_file():
        if default is not None:
            return default
        raise DataError(f"missing {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun the step that writes it") from e


def _num(x) -> float:
    """A JSON number as float; ``None`` (a culture without items, or undefined) as NaN."""
    return float("nan") if x is None else float(x)


def _matrix(rows) -> np.ndarray:
    """A JSON [S][C] matrix with ``null`` cells as a float64 array with NaN."""
    return np.array([[_num(v) for v in row] for row in rows], dtype=np.float64).reshape(
        len(rows), -1
    )


# -- formatting --------------------------------------------------------------------------------
def fmt_points(x) -> str:
    """Accuracy points with one decimal; ``n/a`` when undefined."""
    return _fmt(x, 1)


def fmt_flip(x) -> str:
    """A flip rate (fraction) with three decimals; ``n/a`` when undefined."""
    return _fmt(x, 3)


def _fmt(x, decimals: int) -> str:
    x = _num(x)
    if math.isnan(x):
        return "n/a"
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _fmt_count(x) -> str:
    """A neuron count; RND's counts are means over draws, so they may be fractional."""
    x = _num(x)
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-6 else f"{x:,.1f}"  # 1e-6: float sums of means


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A markdown table; ``align`` gives one ``l``/``r`` per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    return [_row(header), _row(rule)] + [_row(r) for r in rows]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# -- summaries ---------------------------------------------------------------------------------
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
        v = _num(run.evals[method].get(measure.key(by)))
        return (math.isnan(v), sign * v if not math.isnan(v) else 0.0)

    return sorted(run.evals, key=key)


def beats_rnd(run: RunFiles, method: str, measure: Measure) -> bool | None:
    """Whether ``method``'s gap is more selective than RND's mean by more than 2 RND sd.

    None where it cannot be said: no RND, fewer than two draws (sd unknown), undefined gap.
    """
    rnd, key = run.rnd, measure.key("gap")
    if rnd is None or len(rnd.get("draws", [])) < 2:
        return None
    gap, mean, sd = _num(run.evals[method].get(key)), _num(rnd.get(key)), _num(rnd.get(key + "_sd"))
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
    gap = _num(ev.get(k("gap")))
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
    gap, mean = _num(run.evals[best].get(key)), _num(rnd.get(key))
    if draws < 2:
        return (
            f"RND has {draws} draw(s), so its spread is unknown: its gap is {f(mean)}"
            f"{measure.unit}, {f(abs(gap - mean))} from {best}'s."
        )
    sd = _num(rnd.get(key + "_sd"))
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


# -- layers and overlap ------------------------------------------------------------------------
def layer_totals(run: RunFiles, method: str) -> np.ndarray:
    """Selected neurons per layer, summed over cultures, float64 [L] (RND: mean over draws)."""
    counts = run.evals[method].get("layer_counts")
    if counts is None:  # older results: count from the masks file
        masks = _load_masks_for(run, method)
        if not masks:
            return np.zeros(0)
        return np.mean([m.layer_counts().sum(0).double().numpy() for m in masks], axis=0)
    return _matrix(counts).sum(axis=0)


def top_layers(totals: np.ndarray, k: int = TOP_LAYERS) -> list[tuple[int, float]]:
    """The ``k`` layers with most selected neurons, as (layer, count); ties go to lower layers."""
    order = sorted(range(len(totals)), key=lambda layer: (-totals[layer], layer))
    return [(layer, float(totals[layer])) for layer in order[:k] if totals[layer] > 0]


def _load_masks_for(run: RunFiles, method: str) -> list[Masks]:
    """The method's masks (RND: every ``rnd<i>`` draw); empty when the files are absent."""
    mask_dir = run.out / "masks"
    if method != RND:
        path = mask_dir / f"{method}.safetensors"
        return [load_masks(path)] if path.is_file() else []
    draws = sorted(mask_dir.glob("rnd*.safetensors"), key=lambda p: _draw_index(p.stem))
    return [load_masks(p) for p in draws if _draw_index(p.stem) >= 0]


def _draw_index(stem: str) -> int:
    """``rnd3`` -> 3; -1 for anything else."""
    tail = stem[len(RND) :]
    return int(tail) if stem.startswith(RND) and tail.isdigit() else -1


def same_culture_jaccard(a: Masks, b: Masks) -> float:
    """Mean over cultures of |A_c & B_c| / |A_c | B_c| (NaN pairs, two empty sets, skipped)."""
    common = [name for name in a.names if name in b.names]
    if not common:
        return float("nan")
    j = a.jaccard(b).numpy()
    vals = np.array([j[a.names.index(n), b.names.index(n)] for n in common])
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def overlap(run: RunFiles) -> tuple[list[str], np.ndarray] | None:
    """Mean same-culture Jaccard between methods, [M, M] (RND averaged over draws, NaN on the
    diagonal: a method against itself is trivially 1); None when no masks are stored."""
    masks = {m: _load_masks_for(run, m) for m in run.evals}
    names = [m for m in run.evals if masks[m]]
    if len(names) < 2:
        return None
    out = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            out[i, j] = out[j, i] = np.nanmean(
                [same_culture_jaccard(x, y) for x in masks[a] for y in masks[b]]
            )
    return names, out


# -- figures -----------------------------------------------------------------------------------
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
            _heatmap(delta_path, _matrix(ev["delta"]), run.cultures, _title(run, method, "delta"),
                     "accuracy change (points, ablated - full)", diverging=True)  # fmt: skip
            written[method]["delta"] = f"{FIGURES_DIR}/{delta_path.name}"
        else:
            # A delta figure from an earlier run with labels would contradict this report.
            delta_path.unlink(missing_ok=True)
        flip_path = fig_dir / f"{method}_flip.png"
        _heatmap(flip_path, _matrix(ev["flip"]), run.cultures, _title(run, method, "flip"),
                 "flip rate (fraction of items whose answer changed)", diverging=False)  # fmt: skip
        written[method]["flip"] = f"{FIGURES_DIR}/{flip_path.name}"
    layers_path = fig_dir / "layers.png"
    if _layers_figure(run, layers_path):
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


def _new_figure(width: float, height: float):
    """A figure outside pyplot (no global state, no display, nothing to close); Agg renders it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(path: Path, m: np.ndarray, cultures: list[str], title: str, label: str,
             diverging: bool) -> None:  # fmt: skip
    """One [S, C] matrix: rows the ablated culture's neurons, columns the evaluated culture."""
    import matplotlib

    C = len(cultures)
    side = min(max(4.5, 0.35 * C + 3.0), 16.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    if diverging:  # centred at 0: red = accuracy lost, blue = gained
        lim = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        cmap, vmin, vmax = matplotlib.colormaps["RdBu"], -lim, lim
    else:
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        cmap, vmin, vmax = matplotlib.colormaps["viridis"], 0.0, top
    cmap = cmap.with_extremes(bad="lightgrey")  # NaN: a culture without evaluation items
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    ax.set_xticks(range(C), labels=cultures, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(C), labels=cultures)
    ax.set_xlabel("evaluated culture")
    ax.set_ylabel("culture whose neurons are ablated")
    ax.set_title(title, fontsize=11)
    if C <= ANNOTATE_MAX_CULTURES:
        _annotate(ax, m, image, decimals=1 if diverging else 3)
    _save(fig, path)


def _annotate(ax, m: np.ndarray, image, decimals: int) -> None:
    """Write each cell's value, white on dark cells and black on light ones."""
    for (i, j), v in np.ndenumerate(m):
        if not np.isfinite(v):
            continue
        r, g, b, _ = image.cmap(image.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, _fmt(v, decimals), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")  # fmt: skip


def _layers_figure(run: RunFiles, path: Path) -> bool:
    """Share of each method's selected neurons per layer; False (nothing written) if none."""
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    drew = False
    for method in run.evals:
        totals = layer_totals(run, method)
        if totals.size == 0 or totals.sum() == 0:
            continue
        # Shares, not counts: methods select different totals (lape assigns a neuron to several
        # cultures); the legend keeps the counts.
        share = 100 * totals / totals.sum()
        style = dict(color="grey", linestyle="--") if method == RND else dict(marker="o", ms=3)
        label = f"{method} ({_fmt_count(totals.sum())} neurons)"
        ax.plot(range(len(totals)), share, label=label, **style)
        drew = True
    if not drew:
        return False
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer of the language model (0 = first)")
    ax.set_ylabel("share of the method's selected neurons (%)")
    ax.set_title(f"Where the selected neurons sit (summed over {len(run.cultures)} cultures)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """PNG written to a temporary file and renamed, so a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


# -- report.md ---------------------------------------------------------------------------------
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
    lines = render(run, description, figures)
    path = run.out / REPORT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
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
            _fmt_count(ident[c]) if ident else "n/a",
            _fmt_count(tokens[c]) if tokens else "n/a",
            _fmt_count(first["items_per_culture"][c]) if "items_per_culture" in first else "n/a",
        ])  # fmt: skip
    lines += _table(["culture", "identification items counted", "tokens counted", "evaluation items"],
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
        acc = [_num(v) for v in first["accuracy_full"]]
        rows = [[name, fmt_points(a)] for name, a in zip(run.cultures, acc, strict=True)]
        defined = [a for a in acc if not math.isnan(a)]
        if len(run.cultures) > 1:
            mean = np.mean(defined) if defined else None
            rows.append(["**mean of cultures**", fmt_points(mean)])
        lines += _table(["culture", "full-model accuracy (%)"], rows)
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
    lines += _table(header, rows)
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
        cells += [fmt_flip(1 - _num(ev.get(k))) for k in ("flip_self", "flip_cross")]
    return [f"**{method}**" if method != RND else method, *cells, beats]


def _layers(run: RunFiles, figures: dict[str, dict[str, str]]) -> list[str]:
    lines = ["## Where the selected neurons sit", "",
             f"The {TOP_LAYERS} layers with most selected neurons (summed over cultures; layers "
             "numbered from 0; RND: mean over draws).", ""]  # fmt: skip
    rows = []
    for method in run.evals:
        totals = layer_totals(run, method)
        top = ", ".join(f"layer {layer} ({_fmt_count(n)})" for layer, n in top_layers(totals))
        rows.append([method, _fmt_count(totals.sum()), top or "none selected"])
    lines += _table(["method", "selected (sum over cultures)", "top layers (count)"], rows, "lrl")
    if "layers" in figures:
        lines += ["", f"![Selected neurons per layer]({figures['layers']['layers']})"]
    return lines


def _set_sizes(run: RunFiles) -> list[str]:
    lines = ["## Set sizes", "", "Neurons selected per culture (the set ablated for it).", ""]
    rows = []
    for c, name in enumerate(run.cultures):
        rows.append([name] + [_fmt_count(run.evals[m]["set_sizes"][c])
                              if run.evals[m].get("set_sizes") else "n/a"
                              for m in run.evals])  # fmt: skip
    return lines + _table(["culture", *run.evals], rows)


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
    return lines + _table(["", *names], rows)


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
