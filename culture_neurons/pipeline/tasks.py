"""The two tasks a run can do (``RunConfig.task``): how items become a batch, how a group of
items is scored under many conditions, and how the scores become ``eval/<method>.json``.

- ``mc`` (:class:`MCTask`): multiple-choice questions scored by their letter; accuracy (percent),
  delta (points) and flip matrices.
- ``lm`` (:class:`LMTask`): plain sentences scored by their next-token NLL (nats); NLL and
  NLL-change matrices (see :mod:`culture_neurons.scoring.lm`).

Every number of ``eval/<method>.json`` carries its uncertainty (SPEC "Uncertainty and
controls", :mod:`culture_neurons.scoring.uncertainty`): a 95 % paired-bootstrap interval
(``<key>_ci``, ``[lo, hi]``, for every matrix cell and summary, ``intervals`` saying where they
are unreliable) and, for the summaries, the method's own size-matched RND null (``rnd``) and
the tests of :mod:`culture_neurons.pipeline.retest` (computed on the observed per-item
changes, the primary one Holm-adjusted).
"""

from __future__ import annotations

import torch

from culture_neurons.data import stable_seed
from culture_neurons.masks import Masks
from culture_neurons.pipeline import retest
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.scoring import lm
from culture_neurons.scoring.metrics import (
    SUMMARIES,
    matrices,
    nan_to_none,
    per_culture_sum,
    summaries,
)
from culture_neurons.scoring.multiple_choice import Group
from culture_neurons.scoring.prompting import encode, prompt_lengths
from culture_neurons.scoring.random_control import HIGHER, LOWER, TWO_SIDED
from culture_neurons.scoring.uncertainty import CONFIDENCE, Bootstrap, interval, interval_flags

DIRECTIONS = {LOWER: "lower", HIGHER: "higher", TWO_SIDED: "either"}


class MCTask:
    """Multiple choice (SPEC "Evaluation"): a score is the predicted letter index (int64, -1 =
    unparseable); matrices of accuracy (percent), delta (points) and flip rate."""

    name = "mc"
    matrix_keys = ("accuracy", "delta", "flip")  # [S][C] matrices of eval/<method>.json

    def __init__(self, model, processor, config: RunConfig):
        self.model, self.processor, self.config = model, processor, config

    def encode(self, items: list, device) -> dict:
        return encode(self.model, self.processor, items, device=device)

    def lengths(self, items: list) -> list[int]:
        """Each item's prompt tokens (no image processed; see prompting.prompt_lengths)."""
        return prompt_lengths(self.model, self.processor, items)

    def group(self, items: list) -> Group:
        return Group(self.model, self.processor, items, scoring=self.config.scoring,
                     reuse_vision=self.config.reuse_vision)  # fmt: skip

    def empty(self, shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed yet: -2 (never a prediction)."""
        return torch.full(shape, -2, dtype=torch.int64)

    def missing(self, preds: torch.Tensor) -> torch.Tensor:
        return preds == -2

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
        boot = _bootstrap(culture, C, self.config)

        def mats(pred, resampled: Bootstrap | None = None) -> dict:
            return matrices(full, pred, culture, C, labels, boot=resampled)

        # accuracy is lost (lower = more selective) when neurons are damped or ablated; flips
        # count any change (higher = more selective).
        measures = [("flip", "flip_", HIGHER)]
        if labels is not None:
            measures.insert(0, ("delta", "", LOWER if self.config.alpha < 0 else TWO_SIDED))
        keys = ("accuracy_full", "accuracy", "delta", "flip")
        results = {}
        for name in nulls:
            res = _method(name, masks, culture, cultures, nulls, self.config)
            res.update(labels_available=labels is not None,
                       units={"accuracy": "percent", "delta": "points", "flip": "fraction"},
                       unparseable_full=int((full < 0).sum()))  # fmt: skip
            if labels is None:  # no accuracy: its summaries exist, undefined
                res.update({k: None for s in SUMMARIES for k in (s, f"{s}_ci")})
                res.update(p_gap_vs_rnd=None, p_specificity_vs_rnd=None)
            res.update(_assemble(mats, per_set, masks, name, nulls[name], boot, keys, measures))
            results[name] = res
        per_item = {k: retest.changes("mc", full, v, culture, C, labels)
                    for k, v in per_set.items()}  # fmt: skip
        retest.add_tests(results, per_item, culture, seed=boot.seed % 2**32)
        return full_record, results


class LMTask:
    """Sentences (see :mod:`culture_neurons.lm`): a score is an item's summed next-token NLL
    (float64, nats); matrices of the per-culture NLL (nats/token) and its change."""

    name = "lm"
    matrix_keys = ("nll", "delta")

    def __init__(self, model, processor, config: RunConfig):
        lm.check_model(model)
        self.model, self.processor, self.config = model, processor, config

    def encode(self, items: list, device) -> dict:
        return lm.encode_text(self.model, self.processor, items, device=device)

    def lengths(self, items: list) -> list[int]:
        return lm.text_lengths(self.model, self.processor, items)

    def group(self, items: list) -> lm.LMGroup:
        return lm.LMGroup(self.model, self.processor, items)

    def empty(self, shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed yet: NaN (a real NLL is finite)."""
        return torch.full(shape, float("nan"), dtype=torch.float64)

    def missing(self, preds: torch.Tensor) -> torch.Tensor:
        return torch.isnan(preds)

    def tokens(self, items: list) -> torch.Tensor:
        """int64 [n]: each sentence's predicted tokens (from one tokenizer call, no encoding)."""
        return lm.predicted_tokens(torch.tensor(self.lengths(items)))

    def point(self, full, scores, items, culture, C, data) -> dict:
        """As :meth:`MCTask.point`: NLL and NLL-change matrices."""
        return lm.nll_matrices(full, scores, self.tokens(items), culture, C)

    def effect(self, point: dict) -> torch.Tensor:
        """The size of the NLL change (nats/token), either sign."""
        return point["delta"].abs()

    def onto(self, estimated: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Estimated NLL changes put onto the exact full model's summed NLL ``full``."""
        return torch.cat([full[None], full + (estimated[1:] - estimated[:1])])

    def results(self, masks, per_set, full, items, culture, cultures, data, nulls):
        """``(eval/full.json, {method: eval/<method>.json})``, as :meth:`MCTask.results`."""
        tokens = self.tokens(items)
        full_record = {"items": [it.id for it in items], "culture": culture.tolist(),
                       "tokens": tokens.tolist(), "nll_sum": full.tolist()}  # fmt: skip
        C = len(cultures)
        boot = _bootstrap(culture, C, self.config)

        def mats(sums, resampled: Bootstrap | None = None) -> dict:
            return lm.nll_matrices(full, sums, tokens, culture, C, boot=resampled)

        # NLL grows (higher = more selective) when neurons are damped or ablated.
        measures = [("delta", "", HIGHER if self.config.alpha < 0 else TWO_SIDED)]
        results = {}
        for name in nulls:
            res = _method(name, masks, culture, cultures, nulls, self.config)
            res.update(task="lm", labels_available=False,  # no answer key: no accuracy, no flips
                       units=lm.UNITS, tokens_per_culture=per_culture_sum(tokens, culture, C),
                       accuracy_full=None, accuracy=None, flip=None)  # fmt: skip
            res.update(_assemble(mats, per_set, masks, name, nulls[name], boot,
                                 ("nll_full", "nll", "delta"), measures))
            results[name] = res
        per_item = {k: retest.changes("lm", full, v, culture, C, tokens=tokens)
                    for k, v in per_set.items()}  # fmt: skip
        retest.add_tests(results, per_item, culture, seed=boot.seed % 2**32)
        return full_record, results


TASKS = {"mc": MCTask, "lm": LMTask}


def _bootstrap(culture: torch.Tensor, C: int, config: RunConfig) -> Bootstrap:
    """The run's one set of resamples, shared by every method and RND draw (paired)."""
    return Bootstrap.draw(culture, C, config.resamples, seed=_bootstrap_seed(config))


def _bootstrap_seed(config: RunConfig) -> int:
    return stable_seed("bootstrap", config.seed) % 2**63


def _method(name: str, masks: dict[str, Masks], culture: torch.Tensor, cultures: list[str],
            nulls: dict[str, list[str]], config: RunConfig) -> dict:  # fmt: skip
    """The fields every task's ``eval/<method>.json`` starts with: what was ablated or steered,
    and which methods share its RND draws (``rnd_shared_with``: those of the same set sizes)."""
    own = masks[name]
    return {
        "method": name,
        "cultures": cultures,
        "items_per_culture": torch.bincount(culture, minlength=len(cultures)).tolist(),
        "set_sizes": own.sizes().tolist(),
        "layer_counts": own.layer_counts().tolist(),
        "options": dict(own.options),
        "intervention": config.intervention,
        "alpha": config.alpha,
        "matrix": config.matrix,  # exact, estimate or screen (which cells are estimated)
        "rnd_shared_with": [m for m in nulls if m != name and nulls[m] and nulls[m] == nulls[name]],
    }


def _assemble(mats, per_set: dict, masks: dict[str, Masks], name: str, rnd_names: list[str],
              boot: Bootstrap, keys: tuple[str, ...], measures: list) -> dict:  # fmt: skip
    """Matrices of ``name`` with their intervals, and for every measure ``(matrix key, JSON
    prefix, direction)`` its summaries with intervals, RND null and p-values.

    ``mats(scores, boot=None)`` gives the task's matrices (observed, or [B, ...] resampled).
    """
    point, resampled = mats(per_set[name]), mats(per_set[name], boot)
    counts = boot.items_per_culture
    items = int(counts[counts > 0].min()) if bool((counts > 0).any()) else None
    out: dict = {"resamples": boot.resamples, "confidence": CONFIDENCE,
                 "bootstrap_seed": boot.seed}  # fmt: skip
    for key in keys:
        if point[key] is None:
            out[key] = out[f"{key}_ci"] = None
            continue
        out[key] = nan_to_none(point[key].tolist())
        out[f"{key}_ci"] = _ci(resampled[key].movedim(0, -1), items)
    full_key = keys[0]  # accuracy_full / nll_full: its mean over cultures, the headline
    if point[full_key] is not None:
        out[f"{full_key}_mean"] = _num(point[full_key].nanmean())
        out[f"{full_key}_mean_ci"] = _ci(resampled[full_key].nanmean(-1), items)
    out["direction"] = {}  # which way is more selective: lower, higher, either (two-sided)
    out["resampled"] = {}  # per-resample summaries: paired comparisons between methods
    undefined = {}
    per_draw = []
    for key, prefix, direction in measures:
        sign = _sign(direction, point[key])
        observed = summaries(point[key], sign)
        per_resample = summaries(resampled[key], sign)  # each [B]
        for s in SUMMARIES:
            out[prefix + s] = _num(observed[s])
            out[f"{prefix}{s}_ci"] = _ci(per_resample[s], items)
            out["resampled"][prefix + s] = nan_to_none(per_resample[s].tolist())
            undefined[prefix + s] = torch.isnan(per_resample[s]).double().mean().item()
        out["direction"][prefix + "self"] = DIRECTIONS[direction]  # own culture: as the gap
        out["direction"][prefix + "gap"] = DIRECTIONS[direction]
        out["direction"][prefix + "specificity"] = DIRECTIONS[HIGHER]
        per_draw.append({r: summaries(mats(per_set[r])[key], sign) for r in rnd_names})
    # Each RND draw's observed summaries (the tests use its per-item changes: retest).
    null = [{key: draws[r] for (key, _, _), draws in zip(measures, per_draw, strict=True)}
            for r in rnd_names]  # fmt: skip
    out["rnd"] = _rnd_fields([masks[r] for r in rnd_names], rnd_names, null, measures) \
        if rnd_names else None
    out["intervals"] = interval_flags(counts.tolist(), {k: out.get(f"{k}_ci") for k in keys[1:]},
                                      undefined)  # fmt: skip
    return out


def _sign(direction: int, m: torch.Tensor) -> int:
    """How a change is oriented into harm: the measure's direction, or (two-sided) the sign of
    the method's own total change."""
    if direction != TWO_SIDED:
        return direction
    return 1 if torch.nansum(m).item() >= 0 else -1


def _rnd_fields(draws: list[Masks], rnd_names: list[str], null: list, measures: list) -> dict:
    """The ``rnd`` field: the draws' sizes and seed, observed summaries of each draw, their
    mean and sd over draws."""
    rnd: dict = {"draws": len(rnd_names), "set_sizes": draws[0].sizes().tolist(),
                 "seed": draws[0].options.get("seed"), "masks": rnd_names, "per_draw": []}
    observed = [{prefix + s: v for key, prefix, _ in measures for s, v in summ[key].items()}
                for summ in null]  # fmt: skip
    for values in observed:
        rnd["per_draw"].append({k: _num(v) for k, v in values.items()})
    for k in observed[0]:
        t = torch.stack([v[k] for v in observed]).double()
        rnd[f"{k}_mean"] = _num(t.nanmean())
        rnd[f"{k}_sd"] = _num(_nanstd(t)) if len(observed) > 1 else None
    return rnd


def _nanstd(t: torch.Tensor) -> torch.Tensor:
    """Sample sd over the defined values (ddof 1)."""
    t = t[~torch.isnan(t)]
    return t.std() if t.numel() > 1 else torch.tensor(float("nan"))


def _ci(samples: torch.Tensor, items: int | None) -> list:
    """JSON intervals ``[..., [lo, hi]]`` of resampled values ``samples`` [..., B]: expanded
    percentile intervals for means of at least ``items`` items (see uncertainty.expanded_tail;
    the smallest culture's count: conservative for values that pool several cultures)."""
    return nan_to_none(interval(samples, items=items).tolist())


def _num(x) -> float | None:
    x = float(x)
    return None if x != x else x
