"""The multiple-choice task (``mc``): questions about images, scored by their letter (SPEC
"Evaluation"); matrices of accuracy (percent), delta (points) and flip rate."""

from __future__ import annotations

import logging

import torch

from culture_neurons.errors import UsageError
from culture_neurons.eval_schema import ACCURACY_DELTA, FLIP, MATRICES
from culture_neurons.scoring import estimate, multiple_choice
from culture_neurons.scoring.metrics import NOT_COMPUTED, matrices
from culture_neurons.scoring.multiple_choice import Group
from culture_neurons.scoring.prompting import encode, prompt_lengths
from culture_neurons.scoring.uncertainty import Bootstrap
from culture_neurons.tasks.assemble import (
    add_tests,
    assemble,
    bootstrap,
    method_fields,
    oriented,
)

log = logging.getLogger(__name__)


class MCTask:
    """Multiple choice: a score is the predicted letter index (int64, -1 = unparseable)."""

    name = "mc"
    description = "multiple-choice questions about images, scored by accuracy"
    matrix_keys = ("accuracy", "delta", "flip")  # [S][C] matrices of eval/<method>.json
    fixed_identify_on = None
    hidden_labels_note = ("the labels of this data are hidden (Label = -1): identifying on all "
                          "items (--identify-on all), and reporting flip rates, never an "
                          "accuracy")  # fmt: skip
    has_toy = True
    estimate_all_logits = False  # the letter margins at the answer position only

    def __init__(self, model, processor, config):
        self.model, self.processor, self.config = model, processor, config

    # -- what the task is --------------------------------------------------------------------
    @classmethod
    def measures(cls, labels_available: bool) -> tuple:
        """Accuracy points lost (primary) and flips; flips alone where labels are hidden."""
        return (ACCURACY_DELTA, FLIP) if labels_available else (FLIP,)

    @classmethod
    def identify_on(cls, given: str | None, labels_available: bool) -> str:
        """``given``, or by default ``correct`` (the items the full model answers right), or
        ``all`` where there are no labels to tell right from wrong.

        Raises:
            UsageError: ``correct`` given for data whose labels are hidden.
        """
        if given == "correct" and not labels_available:
            raise UsageError("--identify-on correct needs answer labels, but every label of "
                             "this data is hidden (Label = -1); drop --identify-on (all items "
                             "are then used) or pass --identify-on all")  # fmt: skip
        if given is not None:
            return given
        return "correct" if labels_available else "all"

    @classmethod
    def load_data(cls, o, path=None):
        """CVQA from ``--data`` (or the toy's synthetic CVQA at ``path``)."""
        if (o["model"] is None) != (o["data"] is None) and path is None:
            missing = "--data" if o["data"] is None else "--model"
            raise UsageError(f"give both --model and --data (or neither, for the toy); "
                             f"{missing} is missing")  # fmt: skip
        from pathlib import Path

        from culture_neurons.data import load_cvqa

        path = path or o["data"]
        if not Path(path).exists():
            raise UsageError(f"--data {path} does not exist; give a CVQA parquet file or "
                             "folder or a datasets save_to_disk folder")  # fmt: skip
        return load_cvqa(path, grouping=o["grouping"], min_items=o["min_items"],
                         cultures=list(o["cultures"]) if o["cultures"] else None,
                         language=o["language"], on_error=o["on_error"],
                         max_items_per_culture=o["max_items"])  # fmt: skip

    @classmethod
    def write_report(cls, out_dir, description: str = ""):
        from culture_neurons.report import mc

        return mc.write_report(out_dir, description=description)

    @staticmethod
    def estimated(model, processor, items: list, masks, alpha: float,
                  scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
        """int64 letters [1 + K * S, B]: the full model's, then each set's estimated answer
        per scale of the estimated shift."""
        return estimate.estimated_mc(model, processor, items, masks, alpha, scales)

    # -- scoring ------------------------------------------------------------------------------
    def encode(self, items: list, device) -> dict:
        return encode(self.model, self.processor, items, device=device)

    def lengths(self, items: list) -> list[int]:
        """Each item's prompt tokens (no image processed; see prompting.prompt_lengths)."""
        return prompt_lengths(self.model, self.processor, items)

    def group(self, items: list) -> Group:
        return Group(self.model, self.processor, items, scoring=self.config.scoring,
                     reuse_vision=self.config.reuse_vision)  # fmt: skip

    def predict(self, items: list, batch_size: int, progress=None) -> torch.Tensor:
        """The full model's letters [n] (the identification items' correct ones)."""
        return multiple_choice.predict(self.model, self.processor, items, batch_size=batch_size,
                                       scoring=self.config.scoring, progress=progress)  # fmt: skip

    @staticmethod
    def empty(shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed (yet): -2 (never a prediction)."""
        return torch.full(shape, NOT_COMPUTED, dtype=torch.int64)

    @staticmethod
    def missing(preds: torch.Tensor) -> torch.Tensor:
        return preds == NOT_COMPUTED

    # -- scores to numbers ----------------------------------------------------------------
    def point(self, full, scores, items, culture, C, data) -> dict:
        """The matrices of scores ``scores`` [S, n] against ``full`` [n], without intervals."""
        labels = torch.tensor([it.label for it in items]) if data.labels_available else None
        return matrices(full, scores, culture, C, labels)

    def effect(self, point: dict) -> torch.Tensor:
        """How much each cell is affected (screening's ranking): the share of changed answers
        (defined with labels hidden too)."""
        return point["flip"]

    def onto(self, estimated: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Estimated scores [1 + S, n] put onto the exact full model's ``full`` [n]: an answer
        the estimate leaves unchanged is the full model's (the two forwards may differ in the
        last bits, never in what the estimate claims)."""
        rows = estimated[1:]
        return torch.cat([full[None], torch.where(rows == estimated[:1], full, rows)])

    def results(self, masks, per_set, full, items, culture, cultures, data, nulls):
        """``(eval/full.json, {method: eval/<method>.json})``: ``per_set`` maps every mask name
        (methods and RND draws) to its scores [C, n], ``nulls`` each method to its RND draws."""
        labels = torch.tensor([it.label for it in items]) if data.labels_available else None
        full_record = {
            "items": [it.id for it in items], "culture": culture.tolist(),
            "label": None if labels is None else labels.tolist(), "pred": full.tolist(),
        }  # fmt: skip
        C = len(cultures)
        boot = bootstrap(culture, C, self.config, per_set, self.missing)

        def mats(pred, resampled: Bootstrap | None = None) -> dict:
            return matrices(full, pred, culture, C, labels, boot=resampled)

        # accuracy is lost (lower = more selective) when neurons are damped or ablated; flips
        # count any change (higher = more selective).
        measured = self.measures(labels is not None)
        keys = ("accuracy_full", "accuracy", "delta", "flip")
        results = {}
        for name in nulls:
            res = method_fields(name, masks, culture, cultures, nulls, self.config, measured)
            res.update(labels_available=labels is not None,
                       units={"accuracy": MATRICES["accuracy"], ACCURACY_DELTA.key: ACCURACY_DELTA.unit,
                              FLIP.key: FLIP.unit},
                       unparseable_full=int((full < 0).sum()))  # fmt: skip
            if labels is None:  # no accuracy: its summaries exist, undefined
                res.update(dict.fromkeys(ACCURACY_DELTA.keys()))
            res.update(assemble(mats, per_set, masks, name, nulls[name], boot, keys,
                                oriented(measured, self.config.alpha)))  # fmt: skip
            results[name] = res
        add_tests(results, per_set, full, culture, self.changes, self.item_data(items, data),
                  boot)  # fmt: skip
        return full_record, results

    # -- per-item changes (what the tests against RND recompute from) --------------------------
    def item_data(self, items: list, data) -> dict:
        """What :meth:`changes` needs of the items besides their scores: the labels, if any."""
        if not data.labels_available:
            return {}
        return {"labels": torch.tensor([it.label for it in items])}

    @staticmethod
    def changes(full: torch.Tensor, scores: torch.Tensor, culture: torch.Tensor, C: int,
                item_data: dict) -> dict:  # fmt: skip
        """Per-item changes ``{measure key: [S, n]}`` of ``scores`` [S, n] against ``full``
        [n], a culture's plain mean being its matrix cell: ``flip`` (0/1) and, with labels,
        ``delta`` (points: 100 x (right under the set - right under the full model)); NaN
        where the item was not computed under the set (``--matrix sample``)."""
        computed = scores != NOT_COMPUTED

        def change(x: torch.Tensor) -> torch.Tensor:
            return torch.where(computed, x.double(), torch.nan)

        out = {FLIP.key: change(scores != full)}
        labels = item_data.get("labels")
        if labels is not None:
            out[ACCURACY_DELTA.key] = 100.0 * change((scores == labels).double()
                                                     - (full == labels).double())  # fmt: skip
        return out
