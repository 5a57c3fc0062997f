"""RunConfig: every option that changes the numbers of a run (stored in ``OUT/run.json``)."""

from __future__ import annotations

from dataclasses import dataclass

from culture_neurons.errors import UsageError
from culture_neurons.selection import METHODS

TASKS = ("mc", "lm")


@dataclass
class RunConfig:
    """Every option that changes the numbers of a run (stored in ``OUT/run.json``)."""

    methods: tuple[str, ...] = ("cas", "lap", "lape", "mad")
    ratio: float = 0.005  # share of L*N neurons per culture (lape: its top_rate)
    per_layer: bool = False
    scope: str = "all"
    activation: str = "gate"
    identify_on: str = "correct"  # "correct": items the full model answers right; "all"
    split_ratio: float = 0.5  # identification share of each culture's items
    seed: int = 0
    rnd_draws: int = 3  # RND control sets, size-matched to rnd_like
    rnd_like: str = "cas"
    scoring: str = "logits"
    batch_size: int = 8  # rows per forward
    backend: str = "auto"
    checkpoint_every: int = 0  # identification batches between checkpoints (0: by time only)
    checkpoint_minutes: float = 10.0  # wall time between statistics checkpoints (run.Checkpoints)
    reuse_vision: bool = True
    task: str = "mc"  # "mc": multiple choice (accuracy); "lm": sentences (next-token NLL)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if self.task not in TASKS:
            raise UsageError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "lm" and self.identify_on == "correct":
            # A sentence has no right answer: every identification item is recorded. "correct"
            # is only RunConfig's default here (the CLI refuses it when given for lm).
            self.identify_on = "all"
        unknown = [m for m in self.methods if m not in METHODS or m == "rnd"]
        if unknown:
            raise UsageError(
                f"unknown method(s) {', '.join(unknown)}; choose from cas, lap, lape, mad "
                "(rnd runs as the control of rnd_like)"
            )
        if not 0 < self.ratio < 1:
            raise UsageError(f"ratio must be in (0, 1), got {self.ratio}")
        if not 0 < self.split_ratio < 1:
            raise UsageError(f"split_ratio must be in (0, 1), got {self.split_ratio}")
        if self.identify_on not in ("correct", "all"):
            raise UsageError(f"identify_on must be 'correct' or 'all', got {self.identify_on!r}")
        if self.rnd_draws and self.rnd_like not in self.methods:
            raise UsageError(f"rnd_like={self.rnd_like!r} is not among methods {self.methods}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")


