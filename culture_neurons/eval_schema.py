"""The schema of ``OUT/eval/<method>.json``, defined once: what every key means.

A task (:mod:`culture_neurons.tasks`) writes its numbers with these definitions; the report,
the command line's summary and any reader of an eval JSON read them back with the same ones
(this module needs neither torch nor a model)::

    from culture_neurons.eval_schema import measures_of
    for m in measures_of(ev):                # the primary measure first
        print(m.summary("gap"), ev[m.summary("gap")], ev[m.p("gap")], m.unit)

A **measure** is a matrix of changes ``[S][C]`` (set s's effect on culture c's items) and its
summaries over that matrix (:data:`SUMMARIES`), written under the measure's prefix:

    <prefix><summary>               observed summary                  gap, flip_gap
    <prefix><summary>_ci            its 95 % interval [lo, hi]        gap_ci
    p_<prefix><summary>_vs_rnd      p against the method's RND draws  p_gap_vs_rnd
    p_<prefix>gap_vs_rnd_adj        the primary measure's p, Holm-adjusted across methods
    direction[<prefix><summary>]    which way is more selective       lower, higher, either
    resampled[<prefix><summary>]    the summary on every resample     (paired comparisons)

Matrices (:data:`MATRICES`) are ``<key>`` with ``<key>_ci`` beside them (and, for a measure
whose cells are tested, ``<key>_cell_p`` and its Benjamini-Hochberg ``<key>_cell_q``). An eval JSON lists its
measures by name (``measures``, the primary one first); :func:`measures_of` reads that list
(or, for a file written before it existed, asks the file's task).
"""

from __future__ import annotations

from dataclasses import dataclass

# Summaries of a [S][C] matrix (scoring.metrics computes them): own culture's cell (self), the
# others' mean (cross), self - cross (gap), and the share of the effect on its own culture.
SUMMARIES = ("self", "cross", "gap", "specificity")
DIRECTIONS = ("lower", "higher", "either")  # which way is more selective (two-sided: either)


@dataclass(frozen=True)
class Measure:
    """One measure of a task's eval JSON (see the module doc for the keys it owns)."""

    name: str  # registry name, as listed in an eval JSON's ``measures``
    key: str  # its matrix: delta, flip
    prefix: str  # of its summaries: "" (gap), "flip_" (flip_gap)
    unit: str  # of its matrix and summaries
    label: str  # what the number is, in words (console, report)
    decimals: int  # shown on the console
    harm: str  # the direction of damage (ablation, damping): lower or higher
    signed: bool = True  # False: counts any change (a flip), whatever the intervention
    cells_tested: bool = False  # each matrix cell has its own test (``<key>_cell_p``, ``_q``)

    def summary(self, s: str = "gap") -> str:
        return self.prefix + s

    def ci(self, s: str = "gap") -> str:
        return ci_of(self.summary(s))

    def p(self, s: str = "gap") -> str:
        return p_of(self.summary(s))

    def p_adjusted(self, s: str = "gap") -> str:
        """The primary measure's p Holm-adjusted across the run's methods."""
        return p_adjusted_of(self.summary(s))

    def cell_p(self) -> str:
        return f"{self.key}_cell_p"

    def cell_q(self) -> str:
        return f"{self.key}_cell_q"

    def direction(self, alpha: float) -> str:
        """Which way a more selective method moves the gap: the direction of damage where
        neurons are damped or ablated (alpha < 0), either way where they are amplified (a
        measure of any change, unsigned, keeps its direction)."""
        return self.harm if alpha < 0 or not self.signed else "either"

    def keys(self) -> list[str]:
        """Every top-level key this measure writes (see the module doc)."""
        keys = [k for s in SUMMARIES for k in (self.summary(s), self.ci(s))]
        keys += [self.p(s) for s in TESTED]
        return keys + ([self.cell_p(), self.cell_q()] if self.cells_tested else [])


def ci_of(key: str) -> str:
    """The interval of value ``key`` (a summary, a matrix): ``<key>_ci``."""
    return f"{key}_ci"


def p_of(summary_key: str) -> str:
    """The p against RND of summary ``summary_key`` (gap, flip_gap, ...)."""
    return f"p_{summary_key}_vs_rnd"


def p_adjusted_of(summary_key: str) -> str:
    return p_of(summary_key) + "_adj"


TESTED = ("gap", "specificity")  # the summaries tested against RND (p_..._vs_rnd)

ACCURACY_DELTA = Measure("accuracy_delta", "delta", "", "points", "accuracy points", 1, "lower",
                         cells_tested=True)  # fmt: skip
FLIP = Measure("flip", "flip", "flip_", "fraction", "flip rate", 3, "higher", signed=False)
NLL_DELTA = Measure("nll_delta", "delta", "", "nats/token (ablated - full; positive = hurt)",
                    "NLL change, nats/token", 4, "higher", cells_tested=True)  # fmt: skip
MEASURES = {m.name: m for m in (ACCURACY_DELTA, FLIP, NLL_DELTA)}

# Matrices ([C] for the full model, [S][C] otherwise), each with ``<key>_ci``: their units.
MATRICES = {
    "accuracy_full": "percent", "accuracy": "percent", "delta": "the measure's unit",
    "flip": FLIP.unit, "nll_full": "nats/token", "nll": "nats/token",
}  # fmt: skip

# The other top-level fields, what each holds.
FIELDS = {
    "method": "the selector (cas, lap, lape, mad)",
    "task": "the run's task, where not the default",
    "measures": "the measures' names (MEASURES), the primary one first",
    "cultures": "the C cultures, in matrix order",
    "items_per_culture": "[C] evaluation items",
    "set_sizes": "[C] neurons in each culture's set",
    "layer_counts": "[C][L] neurons per layer",
    "options": "the selector's settings",
    "intervention": "ablate or steer",
    "alpha": "a := (1 + alpha) a on the set's neurons (-1: ablation)",
    "matrix": "exact, estimate or screen: which cells are estimated",
    "rnd_shared_with": "methods of the same set sizes (their RND draws are shared)",
    "labels_available": "whether answer labels exist (accuracy is defined)",
    "units": "{matrix: unit}",
    "unparseable_full": "items the full model gave no letter for",
    "tokens_per_culture": "[C] predicted tokens (language modelling)",
    "resamples": "bootstrap resamples B",
    "confidence": "of every interval (0.95)",
    "bootstrap_seed": "seed of the resamples (equal seeds: paired comparisons)",
    "accuracy_full_mean": "mean full-model accuracy over cultures",
    "accuracy_full_mean_ci": "its interval",
    "nll_full_mean": "mean full-model NLL over cultures",
    "nll_full_mean_ci": "its interval",
    "rnd": "the size-matched RND draws: sizes, seed, masks, per-draw summaries, mean, sd",
    "p_resolution": "the smallest p-value the draws can give",
    "tests": "{summary: the test behind its p (name, null, statistic, role: primary or secondary)}",
    "primary": "the primary measure's summary key, its p and Holm-adjusted p across methods",
    "intervals": "where the intervals are unreliable (few items, undefined resamples)",
    "direction": "{summary: lower | higher | either}",
    "resampled": "{summary: [B] values on the resamples}",
    "masks_hash": "{mask: content hash} these numbers belong to",
    "screen_budget": "--matrix screen: exact cells per mask",
    "confirmed": "--matrix screen: [S][C] cells computed exactly",
    "estimate": "--matrix screen: {matrix: [S][C]} as the estimate alone gives it",
    "stability": "split-half stability of the method's selection (pipeline.halves): per culture "
                 "(names) the Jaccard of the two halves' sets, its expectation for random sets of "
                 "their sizes from the pool, the sizes [[a, b]], the halves' items, the means; "
                 "or {unavailable: why}",
    "sample": "--matrix sample: the share, its seed, the items sampled and all per culture, "
              "the prefills against the exact matrix's",
    "screen": "--matrix screen: each own mask's exact / estimated effect ratio and the factor "
              "its most-off first cell is off by (worst_cell), masks confirmed whole, the "
              "rounds (drifting masks, unsettled conclusions), prefills",
}


def measures_of(ev: dict) -> tuple[Measure, ...]:
    """The measures of eval JSON ``ev``, the primary one first."""
    names = ev.get("measures")
    if names is None:  # written before eval JSONs listed their measures: its task knows
        from culture_neurons.tasks import task_class

        return task_class(ev.get("task")).measures(bool(ev.get("labels_available", True)))
    return tuple(MEASURES[n] for n in names)


def primary(ev: dict) -> Measure:
    """The measure of ``ev``'s headline numbers (and of its console line)."""
    return measures_of(ev)[0]


def parse(key: str, ev: dict) -> tuple[Measure, str, str] | None:
    """``(measure, summary, kind)`` of summary key ``key`` of eval JSON ``ev`` (kind: ``value``,
    ``ci``, ``p`` or ``p_adjusted``, as :meth:`Measure.summary`, :meth:`Measure.ci`,
    :meth:`Measure.p`, :meth:`Measure.p_adjusted` build it); None where ``key`` is no summary
    of ``ev``'s measures."""
    for m in measures_of(ev):
        for s in SUMMARIES:
            built = {"value": m.summary(s), "ci": m.ci(s)}
            if s in TESTED:
                built.update(p=m.p(s), p_adjusted=m.p_adjusted(s))
            for kind, k in built.items():
                if key == k:
                    return m, s, kind
    return None


def describe(key: str, ev: dict) -> str | None:
    """What top-level key ``key`` of eval JSON ``ev`` holds (None: not a key of the schema)."""
    if key in FIELDS:
        return FIELDS[key]
    base = key.removesuffix("_ci")
    if base in MATRICES:
        return f"matrix {base} ({MATRICES[base]})" + (", its intervals" if key != base else "")
    found = parse(key, ev)
    if found is not None:
        m, s, kind = found
        return {"value": f"{s} of the {m.label}", "ci": f"interval of {m.summary(s)}",
                "p": f"p of {m.summary(s)} against RND",
                "p_adjusted": f"p of {m.summary(s)} against RND, Holm-adjusted"}[kind]  # fmt: skip
    for m in measures_of(ev):
        if m.cells_tested and key in (m.cell_p(), m.cell_q()):
            return f"[S][C] per-cell p ({m.cell_p()}) and BH q ({m.cell_q()}) of {m.key}"
    if any(key in m.keys() for m in MEASURES.values()):  # another measure's, left undefined
        return "undefined here (None): this run has no such measure"
    return None
