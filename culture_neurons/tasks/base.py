"""The Task protocol: everything a run asks of its task (see :mod:`culture_neurons.tasks`).

Scores are the task's own (MC: int64 letter indices, -1 unparseable; LM: float64 summed NLL);
``[1 + S, n]`` score tensors hold the full model in row 0 and set s in row 1 + s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from culture_neurons.eval_schema import Measure


class Task(Protocol):
    name: str  # its --task value
    description: str  # --task's help
    matrix_keys: tuple[str, ...]  # the [S][C] matrices of its eval JSON
    # identify_on where the task has only one (a sentence has no right answer), else None
    fixed_identify_on: str | None
    hidden_labels_note: str | None  # logged when hidden labels make identify_on "all"
    has_toy: bool  # whether the embedded toy (no --model, no --data) is of this task
    # whether its estimate differentiates every position's logits (the memory bound's term,
    # culture_neurons.instrument.attribution.estimate_bytes)
    estimate_all_logits: bool

    def __init__(self, model, processor, config) -> None: ...

    # -- what the task is, before any model is loaded -------------------------------------
    @classmethod
    def measures(cls, labels_available: bool) -> tuple[Measure, ...]:
        """Its eval JSON's measures, the primary one first."""

    @classmethod
    def identify_on(cls, given: str | None, labels_available: bool) -> str:
        """The items identification records: ``given`` (checked) or the task's default."""

    @classmethod
    def load_data(cls, options, path=None):
        """The command line's items (``options``: its parsed options; ``path``: the toy's)."""

    @classmethod
    def write_report(cls, out_dir: Path, description: str = "") -> Path:
        """``OUT/report.md`` (and figures) of a finished run."""

    @staticmethod
    def estimated(model, processor, items: list, masks, alpha: float,
                  scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
        """``[1 + K * S, B]`` scores of one batch: row 0 exact, the others first-order
        estimates, block k with the estimated change x ``scales[k]``."""

    # -- scoring ------------------------------------------------------------------------
    def encode(self, items: list, device) -> dict:
        """Model inputs of one batch."""

    def lengths(self, items: list) -> list[int]:
        """Each item's prompt tokens (no image processed)."""

    def group(self, items: list):
        """Items scored under many conditions: ``.predict(conditions, ablator)`` -> [k, B]."""

    def predict(self, items: list, batch_size: int, progress=None) -> torch.Tensor:
        """The full model's scores [n]."""

    @staticmethod
    def empty(shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed (yet, or ever: ``--matrix sample``)."""

    @staticmethod
    def missing(scores: torch.Tensor) -> torch.Tensor:
        """bool: where ``scores`` are :meth:`empty`'s."""

    # -- scores to numbers ----------------------------------------------------------------
    def point(self, full, scores, items, culture, C, data) -> dict:
        """The matrices of ``scores`` [S, n] against ``full`` [n], without intervals."""

    def effect(self, point: dict) -> torch.Tensor:
        """[S, C] how much each cell is affected (screening's ranking)."""

    def onto(self, estimated: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Estimated scores [1 + S, n] put onto the exact full model's ``full`` [n]."""

    def results(self, masks, per_set, full, items, culture, cultures, data, nulls):
        """``(eval/full.json, {method: eval/<method>.json})``."""

    # -- per-item changes (kept in eval/items.safetensors: report recomputes the tests) -----
    def item_data(self, items: list, data) -> dict:
        """``{name: tensor [n]}`` that :meth:`changes` needs besides the scores."""

    @staticmethod
    def changes(full, scores, culture, C: int, item_data: dict) -> dict:
        """``{measure key: [S, n]}`` per-item changes, a culture's plain mean its cell."""
