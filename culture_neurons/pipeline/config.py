"""RunConfig: every option that changes the numbers of a run (stored in ``OUT/run.json``).

Each field belongs to the step that first uses it (``metadata["step"]``), which says what a
later step may do with a different value (see :mod:`culture_neurons.pipeline.rundir`):

- ``identify``: fixed once statistics are recorded (another value is another run);
- ``select``: ``select --overwrite`` may change it, recorded in run.json (masks carry it);
- ``evaluate``: any evaluation may change it, recorded in run.json (cached predictions are
  keyed on it);
- ``exec``: how the work is done, not what it computes (the latest value is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from culture_neurons import tasks
from culture_neurons.errors import UsageError
from culture_neurons.scoring.uncertainty import DEFAULT_RESAMPLES
from culture_neurons.selection.methods import CONTRASTS, SELECTORS

TASKS = tuple(tasks.TASKS)  # the registry's names (culture_neurons.tasks)
STEPS = ("identify", "select", "evaluate", "exec")
INTERVENTIONS = ("ablate", "steer")
IDENTIFY_ON = ("correct", "all")  # the items whose statistics are recorded
# How the ablation matrix is computed (SPEC "Matrix modes", culture_neurons.pipeline.screen).
MATRIX_MODES = ("exact", "estimate", "screen", "sample")
# screen: off-diagonal cells per mask (each method's and each RND draw's) confirmed exactly at
# first, the ones the estimate finds most affected (culture_neurons.pipeline.screen then
# confirms more where the estimate drifts or a conclusion depends on it). Each costs one
# condition on one culture's items. RunConfig's None: this default under --matrix screen.
SCREEN_BUDGET = 3
# sample: the share of each culture's items computed under the other cultures' sets (the
# diagonal runs on every item; culture_neurons.scoring.sampled). A quarter costs 1/C + (C - 1)
# / (4 C) of exact's prefills (0.34 at C = 8) and keeps every test exact (less power). RunConfig's
# None: this default under --matrix sample.
SAMPLE_SHARE = 0.25
# Settings only one matrix mode reads: (mode, setting, its default there). Refused under
# another mode, and not carried from a run evaluated in that mode to another.
MODE_SETTINGS = (("screen", "screen_budget", SCREEN_BUDGET), ("sample", "sample_share", SAMPLE_SHARE))
STEER_ALPHA = 0.5  # steering's default alpha: the authors' follow-up work uses 0.5 (SPEC)
# RND draws per distinct set-size vector of the methods: each costs one condition per culture.
# p-values recombine the draws' rows (culture_neurons.scoring.uncertainty), so a few draws
# resolve small p-values; more draws give more power where a method's effect sits in a few
# cultures (one culture's set is then compared with draws + 1 sets).
RND_DRAWS = 5


# The results a run caches in OUT/progress (see culture_neurons.pipeline.run): identification's
# full-model predictions and statistics, the exact and the estimated matrix.
CACHES = ("predictions", "statistics", "matrix", "estimate")
MATRICES = ("matrix", "estimate")  # both matrices' caches


def setting(default, step: str, minimum: float | None = None, share: bool = False,
            caches: tuple[str, ...] = ()):  # fmt: skip
    """A RunConfig field of ``step`` (one of :data:`STEPS`) and its bound, if any: ``minimum``
    (value >= minimum) or ``share`` (0 < value < 1). The bound is stated here only: RunConfig
    and the command line (``options.check``) both check it through :func:`check_bound`.
    ``caches``: the cached results (:data:`CACHES`) whose numbers the value changes, keyed on
    it (:meth:`RunConfig.cache_settings`)."""
    return field(default=default, metadata={"step": step, "minimum": minimum, "share": share,
                                            "caches": caches})  # fmt: skip


def _metadata(name: str) -> dict:
    return next((f.metadata for f in fields(RunConfig) if f.name == name), {})


def minimum_of(name: str) -> float | None:
    """The lower bound of RunConfig field ``name`` (None: none, or not a field)."""
    return _metadata(name).get("minimum")


def check_minimum(value, minimum: float | None, where: str) -> None:
    """UsageError ``{where} must be >= {minimum}`` (the one wording of a lower bound)."""
    if minimum is not None and value is not None and value < minimum:
        raise UsageError(f"{where} must be >= {minimum:g}, got {value}")


def check_bound(name: str, value, where: str | None = None) -> None:
    """UsageError if ``value`` is outside RunConfig field ``name``'s bound; ``where`` names
    its source (default: the flag)."""
    where = where or flag(name)
    meta = _metadata(name)
    if meta.get("share") and value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value < 1):  # fmt: skip
        raise UsageError(f"{where} must be a share in (0, 1) (0.005 = 0.5 %), got {value!r}")
    check_minimum(value, meta.get("minimum"), where)


@dataclass
class RunConfig:
    """Every option that changes the numbers of a run (stored in ``OUT/run.json``)."""

    methods: tuple[str, ...] = setting(SELECTORS, "select")
    ratio: float = setting(0.005, "select", share=True)  # share of L*N per culture: cas, lap, mad
    per_layer: bool = setting(False, "select")
    cas_normalize: bool = setting(False, "select")  # cas ranks P normalised over cultures
    mad_contrast: str = setting("mean", "select")  # mad: M[c] minus the others' mean or max
    lape_top_rate: float = setting(0.01, "select", share=True)  # lape: share of L*N kept
    lape_filter_rate: float = setting(0.95, "select", share=True)  # lape: P order statistic
    lape_bar_ratio: float = setting(0.95, "select", share=True)  # lape: P order statistic
    scope: str = setting("all", "identify")
    activation: str = setting("gate", "identify")
    # "correct": the items answered right; or "all"
    identify_on: str = setting("correct", "identify", caches=("statistics",))
    split_ratio: float = setting(0.5, "identify", share=True)  # identification share
    seed: int = setting(0, "identify")  # the split's (and RND's and the bootstrap's) seed
    rnd_draws: int = setting(RND_DRAWS, "select", minimum=0)  # RND sets per set-size vector
    resamples: int = setting(DEFAULT_RESAMPLES, "evaluate", minimum=1)  # bootstrap resamples
    # A run holds one intervention ("identify": another one is another run, in its own --out,
    # so a steering run's files never mix with an ablation run's). ablate: a := 0; steer:
    # a := (1 + alpha) a, alpha steer only (default 0.5; ablate: -1).
    intervention: str = setting("ablate", "identify", caches=MATRICES)
    alpha: float | None = setting(None, "identify", caches=MATRICES)
    # also picks the correct items
    scoring: str = setting("logits", "identify", caches=("predictions", "statistics", "matrix"))
    # rows per forward (the matrix's groups and forwards are derived from it: keyed on those)
    batch_size: int = setting(8, "exec", minimum=1,
                              caches=("predictions", "statistics", "estimate"))
    backend: str = setting("auto", "exec")
    checkpoint_every: int = setting(0, "exec", minimum=0)  # batches between checkpoints (0: time)
    checkpoint_minutes: float = setting(10.0, "exec", minimum=0)  # wall time between them
    # GiB the estimate's forward and backward may hold above the weights (None: --batch-size
    # items per batch); the items per batch follow from it (instrument.attribution.items_within)
    estimate_memory_gib: float | None = setting(None, "exec", minimum=0.01, caches=("estimate",))
    matrix: str = setting("exact", "evaluate")  # exact, estimate, screen, sample (MATRIX_MODES)
    # extra exact cells per mask; None: SCREEN_BUDGET under screen, refused under another mode
    screen_budget: int | None = setting(None, "evaluate", minimum=0)
    # share of each culture's items off the diagonal; None: SAMPLE_SHARE under sample, refused
    # under another mode
    sample_share: float | None = setting(None, "evaluate", share=True)
    # same numbers, fewer vision-tower passes
    reuse_vision: bool = setting(True, "exec", caches=("matrix",))
    task: str = setting(tasks.DEFAULT, "identify", caches=MATRICES)  # culture_neurons.tasks
    # Image tokens per image at most (None: the processor's default); how each family applies
    # it: culture_neurons.models.image_budget. Identification and evaluation share it.
    max_image_tokens: int | None = setting(None, "identify", minimum=1)
    # Also record the identification items' two hash halves, for split-half stability
    # (culture_neurons.pipeline.halves: 2C totals instead of C, no extra forward).
    halves: bool = setting(True, "identify", caches=("statistics",))

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        fixed = tasks.task_class(self.task).fixed_identify_on
        if fixed is not None and self.identify_on == "correct":
            # E.g. a sentence has no right answer: every identification item is recorded.
            # "correct" is only RunConfig's default here (the CLI refuses it when given).
            self.identify_on = fixed
        unknown = [m for m in self.methods if m not in SELECTORS]
        if unknown:
            raise UsageError(
                f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
                f"{', '.join(SELECTORS)} (rnd runs as every method's size-matched control, see "
                "--rnd-draws)"
            )
        if not self.methods:
            raise UsageError(f"--methods is empty; give at least one of {', '.join(SELECTORS)}")
        for f in fields(self):  # every bound, as the command line checks it
            check_bound(f.name, getattr(self, f.name))
        if self.mad_contrast not in CONTRASTS:
            raise UsageError(f"--mad-contrast must be one of {', '.join(CONTRASTS)}, got "
                             f"{self.mad_contrast!r}")  # fmt: skip
        if self.identify_on not in IDENTIFY_ON:
            raise UsageError(f"--identify-on must be {' or '.join(IDENTIFY_ON)}, got "
                             f"{self.identify_on!r}")  # fmt: skip
        self._check_matrix()
        self._check_intervention()

    def _check_matrix(self) -> None:
        if self.matrix not in MATRIX_MODES:
            raise UsageError(f"--matrix must be one of {', '.join(MATRIX_MODES)}, got "
                             f"{self.matrix!r}")  # fmt: skip
        if self.matrix in ("estimate", "screen") and self.scoring != "logits":
            # The estimate differentiates the letter logits; a generated answer has no gradient.
            raise UsageError(f"--matrix {self.matrix} needs --scoring logits (a generated "
                             f"answer has no gradient), got --scoring {self.scoring}; drop "
                             "--scoring or pass --matrix exact")  # fmt: skip
        # A setting only one mode reads: its default there, refused under another (silently
        # ignoring it would hide a mistyped mode).
        for mode, name, default in MODE_SETTINGS:
            value = getattr(self, name)
            if self.matrix == mode and value is None:
                setattr(self, name, default)
            elif self.matrix != mode and value is not None:
                raise UsageError(f"{flag(name)} {value} applies to --matrix {mode} only, got "
                                 f"--matrix {self.matrix}; pass --matrix {mode} or drop "
                                 f"{flag(name)}")  # fmt: skip

    def _check_intervention(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise UsageError(f"--intervention must be one of {', '.join(INTERVENTIONS)}, got "
                             f"{self.intervention!r}")  # fmt: skip
        if self.intervention == "ablate":
            if self.alpha not in (None, -1, -1.0):
                raise UsageError(f"--alpha {self.alpha} is a steering factor: ablation is alpha "
                                 "= -1; pass --intervention steer to use it")  # fmt: skip
            self.alpha = -1.0
            return
        alpha = STEER_ALPHA if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(
            alpha
        ):
            raise UsageError(f"--alpha must be a finite number, got {alpha!r}")
        if alpha == 0:
            raise UsageError("--alpha 0 multiplies the neurons by 1: it changes nothing; give "
                             "a negative alpha to damp them (-1 = ablate) or a positive one "
                             "to amplify them")  # fmt: skip
        self.alpha = float(alpha)

    def selector_options(self, method: str) -> dict:
        """Keyword arguments of ``culture_neurons.select`` for ``method``."""
        if method == "lape":  # ranks its own share: top_rate, never ratio
            return {"top_rate": self.lape_top_rate, "filter_rate": self.lape_filter_rate,
                    "bar_ratio": self.lape_bar_ratio, "per_layer": self.per_layer}  # fmt: skip
        options = {"ratio": self.ratio, "per_layer": self.per_layer}
        if method == "cas":
            options["normalize"] = self.cas_normalize
        if method == "mad":
            options["contrast"] = self.mad_contrast
        return options

    def cache_settings(self, cache: str) -> dict:
        """``{name: value}`` of the fields that change cached result ``cache`` (one of
        :data:`CACHES`): part of its key, so that another value computes it again."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if cache in f.metadata["caches"]}  # fmt: skip

    def settings(self, *steps: str) -> dict:
        """``{name: value}`` of the fields of ``steps`` (all by default), JSON-ready."""
        out = {}
        for f in fields(self):
            if not steps or f.metadata["step"] in steps:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def step_of(name: str) -> str | None:
    """The step of RunConfig field ``name`` (None: not a RunConfig field)."""
    for f in fields(RunConfig):
        if f.name == name:
            return f.metadata["step"]
    return None


def flag(name: str) -> str:
    """The command-line spelling of option ``name`` (``max_items`` -> ``--max-items``)."""
    return "--" + name.replace("_", "-")


def identify_on_for(given: str | None, labels_available: bool, task: str | None = None) -> str:
    """The identify_on a run of ``task`` uses: ``given``, or the task's default (multiple
    choice: ``correct``, the items the full model answers right, or ``all`` where there are no
    labels to tell right from wrong; see each task's ``identify_on``).

    Raises:
        UsageError: ``correct`` given for data whose labels are hidden (or for a task without
            right answers).
    """
    return tasks.task_class(task).identify_on(given, labels_available)
