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

from dataclasses import dataclass, field, fields

from culture_neurons.errors import UsageError
from culture_neurons.selection import METHODS

TASKS = ("mc", "lm")
STEPS = ("identify", "select", "evaluate", "exec")


def setting(default, step: str):
    """A RunConfig field of ``step`` (one of :data:`STEPS`)."""
    return field(default=default, metadata={"step": step})


@dataclass
class RunConfig:
    """Every option that changes the numbers of a run (stored in ``OUT/run.json``)."""

    methods: tuple[str, ...] = setting(("cas", "lap", "lape", "mad"), "select")
    ratio: float = setting(0.005, "select")  # share of L*N neurons per culture (lape: top_rate)
    per_layer: bool = setting(False, "select")
    scope: str = setting("all", "identify")
    activation: str = setting("gate", "identify")
    identify_on: str = setting("correct", "identify")  # "correct": answered right; or "all"
    split_ratio: float = setting(0.5, "identify")  # identification share of each culture
    seed: int = setting(0, "identify")  # the split's (and RND's) seed
    rnd_draws: int = setting(3, "select")  # RND control sets, size-matched to rnd_like
    rnd_like: str = setting("cas", "select")
    scoring: str = setting("logits", "identify")  # also picks the correct items
    batch_size: int = setting(8, "exec")  # rows per forward
    backend: str = setting("auto", "exec")
    checkpoint_every: int = setting(0, "exec")  # batches between checkpoints (0: by time only)
    checkpoint_minutes: float = setting(10.0, "exec")  # wall time between them (run.Checkpoints)
    reuse_vision: bool = setting(True, "exec")  # same numbers, fewer vision-tower passes
    task: str = setting("mc", "identify")  # "mc": multiple choice; "lm": sentences (NLL)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "lm" and self.identify_on == "correct":
            # A sentence has no right answer: every identification item is recorded. "correct"
            # is only RunConfig's default here (the CLI refuses it when given for lm).
            self.identify_on = "all"
        unknown = [m for m in self.methods if m not in METHODS or m == "rnd"]
        if unknown:
            raise UsageError(
                f"--methods: unknown method(s) {', '.join(unknown)}; choose from cas, lap, "
                "lape, mad (rnd runs as the control of --rnd-like)"
            )
        if not self.methods:
            raise UsageError("--methods is empty; give at least one of cas, lap, lape, mad")
        if not 0 < self.ratio < 1:
            raise UsageError(f"--ratio must be in (0, 1) (0.005 = 0.5 %), got {self.ratio}")
        if not 0 < self.split_ratio < 1:
            raise UsageError(f"--split-ratio must be in (0, 1), got {self.split_ratio}")
        if self.identify_on not in ("correct", "all"):
            raise UsageError(f"--identify-on must be correct or all, got {self.identify_on!r}")
        if self.rnd_draws and self.rnd_like not in self.methods:
            raise UsageError(f"--rnd-like {self.rnd_like} is not among --methods "
                             f"{','.join(self.methods)}")  # fmt: skip
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("rnd_draws", "checkpoint_every", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise UsageError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")

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


def identify_on_for(given: str | None, labels_available: bool, task: str = "mc") -> str:
    """The identify_on a run uses: ``given``, or by default ``correct`` (the items the full
    model answers right), or ``all`` where there are no labels to tell right from wrong.

    Raises:
        UsageError: ``correct`` given for data whose labels are hidden (or for ``task="lm"``).
    """
    if given == "correct" and task == "lm":
        raise UsageError("--identify-on correct does not apply to --task lm: a sentence has no "
                         "right answer, so every identification sentence is recorded; drop "
                         "--identify-on")  # fmt: skip
    if given == "correct" and not labels_available:
        raise UsageError("--identify-on correct needs answer labels, but every label of this "
                         "data is hidden (Label = -1); drop --identify-on (all items are then "
                         "used) or pass --identify-on all")  # fmt: skip
    if given is not None:
        return given
    return "correct" if labels_available and task != "lm" else "all"
