"""The two tasks a run can do (``RunConfig.task``): how items become a batch, how a group of
items is scored under many conditions, and how the scores become ``eval/<method>.json``.

- ``mc`` (:class:`MCTask`): multiple-choice questions scored by their letter; accuracy (percent),
  delta (points) and flip matrices.
- ``lm`` (:class:`LMTask`): plain sentences scored by their next-token NLL (nats); NLL and
  NLL-change matrices (see :mod:`culture_neurons.scoring.lm`).
"""

from __future__ import annotations

import torch

from culture_neurons.masks import Masks
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.scoring import lm
from culture_neurons.scoring.metrics import matrices, nan_to_none, per_culture_sum, self_cross
from culture_neurons.scoring.multiple_choice import Group
from culture_neurons.scoring.prompting import encode


class MCTask:
    """Multiple choice (SPEC "Evaluation"): a score is the predicted letter index (int64, -1 =
    unparseable); matrices of accuracy (percent), delta (points) and flip rate."""

    name = "mc"

    def __init__(self, model, processor, config: RunConfig):
        self.model, self.processor, self.config = model, processor, config

    def encode(self, items: list, device) -> dict:
        return encode(self.model, self.processor, items, device=device)

    def group(self, items: list) -> Group:
        return Group(self.model, self.processor, items, scoring=self.config.scoring,
                     reuse_vision=self.config.reuse_vision)  # fmt: skip

    def empty(self, shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed yet: -2 (never a prediction)."""
        return torch.full(shape, -2, dtype=torch.int64)

    def missing(self, preds: torch.Tensor) -> torch.Tensor:
        return preds == -2

    def results(self, masks, per_method, full, items, culture, cultures, data):
        """``(eval/full.json, {method: eval/<method>.json})`` (RND draws still apart)."""
        labels = torch.tensor([it.label for it in items]) if data.labels_available else None
        full_record = {
            "items": [it.id for it in items], "culture": culture.tolist(),
            "label": None if labels is None else labels.tolist(), "pred": full.tolist(),
        }  # fmt: skip
        results = {name: self._method_result(name, masks[name], per_method[name], full,
                                             culture, labels, cultures)
                   for name in masks}  # fmt: skip
        return full_record, results

    def _method_result(self, name, masks: Masks, pred, full, culture, labels,
                       cultures) -> dict:  # fmt: skip
        C = len(cultures)
        m = matrices(full, pred, culture, C, labels)
        res = {
            "method": name,
            "cultures": cultures,
            "labels_available": labels is not None,
            "units": {"accuracy": "percent", "delta": "points", "flip": "fraction"},
            "items_per_culture": torch.bincount(culture, minlength=C).tolist(),
            "set_sizes": masks.sizes().tolist(),
            "layer_counts": masks.layer_counts().tolist(),
            "unparseable_full": int((full < 0).sum()),
        }
        for key in ("accuracy_full", "accuracy", "delta", "flip"):
            res[key] = None if m[key] is None else nan_to_none(m[key].tolist())
        summary = self_cross(m["delta"]) if m["delta"] is not None else dict.fromkeys(
            ("self", "cross", "gap"))  # fmt: skip
        res.update(summary)
        res.update({f"flip_{k}": v for k, v in self_cross(m["flip"]).items()})
        return res


class LMTask:
    """Sentences (see :mod:`culture_neurons.lm`): a score is an item's summed next-token NLL
    (float64, nats); matrices of the per-culture NLL (nats/token) and its change."""

    name = "lm"

    def __init__(self, model, processor, config: RunConfig):
        lm.check_model(model)
        self.model, self.processor, self.config = model, processor, config

    def encode(self, items: list, device) -> dict:
        return lm.encode_text(self.model, self.processor, items, device=device)

    def group(self, items: list) -> lm.LMGroup:
        return lm.LMGroup(self.model, self.processor, items)

    def empty(self, shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed yet: NaN (a real NLL is finite)."""
        return torch.full(shape, float("nan"), dtype=torch.float64)

    def missing(self, preds: torch.Tensor) -> torch.Tensor:
        return torch.isnan(preds)

    def results(self, masks, per_method, full, items, culture, cultures, data):
        """``(eval/full.json, {method: eval/<method>.json})`` (RND draws still apart)."""
        tokens = torch.cat([lm.target_counts(lm.encode_text(self.model, self.processor, [it])
                                             ["attention_mask"]) for it in items])  # fmt: skip
        full_record = {"items": [it.id for it in items], "culture": culture.tolist(),
                       "tokens": tokens.tolist(), "nll_sum": full.tolist()}  # fmt: skip
        results = {name: lm_method_result(name, masks[name], per_method[name], full, tokens,
                                          culture, cultures)
                   for name in masks}  # fmt: skip
        return full_record, results


TASKS = {"mc": MCTask, "lm": LMTask}


def lm_method_result(name: str, masks, sums, full, tokens, culture, cultures: list[str]) -> dict:
    """The ``eval/<method>.json`` of the LM task (``self``/``cross``/``gap`` of ``delta``)."""
    C = len(cultures)
    m = lm.nll_matrices(full, sums, tokens, culture, C)
    res = {
        "method": name,
        "task": "lm",
        "cultures": cultures,
        "labels_available": False,  # sentences have no answer key: no accuracy, no flips
        "units": lm.UNITS,
        "items_per_culture": torch.bincount(culture, minlength=C).tolist(),
        "tokens_per_culture": per_culture_sum(tokens, culture, C),
        "set_sizes": masks.sizes().tolist(),
        "layer_counts": masks.layer_counts().tolist(),
        "accuracy_full": None,
        "accuracy": None,
        "flip": None,
    }
    for key in ("nll_full", "nll", "delta"):
        res[key] = nan_to_none(m[key].tolist())
    res.update(self_cross(m["delta"]))
    return res
