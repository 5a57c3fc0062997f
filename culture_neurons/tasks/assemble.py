"""What every task's ``eval/<method>.json`` shares (keys: :mod:`culture_neurons.eval_schema`):
the method's fields, the matrices with their intervals and, per measure, the summaries with
their intervals and RND null.

Every number carries its uncertainty (SPEC "Uncertainty and controls",
:mod:`culture_neurons.scoring.uncertainty`): a 95 % paired-bootstrap interval (``<key>_ci``,
``[lo, hi]``, for every matrix cell and summary, ``intervals`` saying where they are
unreliable) and, for the summaries, the method's own size-matched RND null (``rnd``) and the
tests of :mod:`culture_neurons.pipeline.retest` (computed on the observed per-item changes, the
primary one Holm-adjusted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from culture_neurons.data import stable_seed
from culture_neurons.eval_schema import SUMMARIES, Measure
from culture_neurons.masks import Masks
from culture_neurons.scoring.metrics import nan_to_none, summaries
from culture_neurons.scoring.random_control import HIGHER, LOWER, TWO_SIDED
from culture_neurons.scoring.uncertainty import CONFIDENCE, Bootstrap, interval, interval_flags

if TYPE_CHECKING:
    from culture_neurons.pipeline.config import RunConfig

DIRECTIONS = {LOWER: "lower", HIGHER: "higher", TWO_SIDED: "either"}
SIGNS = {word: sign for sign, word in DIRECTIONS.items()}


def oriented(measures: tuple[Measure, ...], alpha: float) -> list[tuple[str, str, int]]:
    """``(matrix key, JSON prefix, direction)`` of each measure under steering factor
    ``alpha`` (what :func:`assemble` summarises)."""
    return [(m.key, m.prefix, SIGNS[m.direction(alpha)]) for m in measures]


def add_tests(results: dict, per_set: dict, full: torch.Tensor, culture: torch.Tensor, changes,
              item_data: dict, boot: Bootstrap) -> None:  # fmt: skip
    """The tests against RND of every method in ``results``, from the per-item changes
    ``changes(full, scores, culture, C, item_data)`` of every mask's scores in ``per_set``
    (:func:`culture_neurons.pipeline.retest.add_tests`)."""
    from culture_neurons.pipeline import retest  # (the pipeline imports the tasks)

    C = next(iter(per_set.values())).shape[0]
    per_item = {k: changes(full, v, culture, C, item_data) for k, v in per_set.items()}
    retest.add_tests(results, per_item, culture, seed=boot.seed % 2**32)


def bootstrap(culture: torch.Tensor, C: int, config: RunConfig, per_set: dict,
              missing) -> Bootstrap:  # fmt: skip
    """The run's one set of resamples, shared by every method and RND draw (paired); where
    some items were not computed under some sets (``per_set`` {mask: scores [C, n]},
    ``missing(scores)`` says which: ``--matrix sample``), the items computed under every set
    and the others are resampled apart."""
    complete = ~torch.stack([missing(v) for v in per_set.values()]).any(0).any(0)  # [n]
    return Bootstrap.draw(culture, C, config.resamples, seed=_bootstrap_seed(config),
                          complete=complete)  # fmt: skip


def _bootstrap_seed(config: RunConfig) -> int:
    return stable_seed("bootstrap", config.seed) % 2**63


def method_fields(name: str, masks: dict[str, Masks], culture: torch.Tensor,
                  cultures: list[str], nulls: dict[str, list[str]], config: RunConfig,
                  measures: tuple[Measure, ...]) -> dict:  # fmt: skip
    """The fields every task's ``eval/<method>.json`` starts with: what was ablated or steered,
    and which methods share its RND draws (``rnd_shared_with``: those of the same set sizes)."""
    own = masks[name]
    return {
        "method": name,
        "measures": [m.name for m in measures],  # the primary one first
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


def assemble(mats, per_set: dict, masks: dict[str, Masks], name: str, rnd_names: list[str],
             boot: Bootstrap, keys: tuple[str, ...], measures: list) -> dict:  # fmt: skip
    """Matrices of ``name`` with their intervals, and for every measure ``(matrix key, JSON
    prefix, direction)`` its summaries with intervals, RND null and p-values.

    ``mats(scores, boot=None)`` gives the task's matrices (observed, or [B, ...] resampled).
    """
    point, resampled = mats(per_set[name]), mats(per_set[name], boot)
    counts = boot.cell_items  # --matrix sample: the share, off the diagonal
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
        out[f"{full_key}_mean"] = num(point[full_key].nanmean())
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
            out[prefix + s] = num(observed[s])
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
        rnd["per_draw"].append({k: num(v) for k, v in values.items()})
    for k in observed[0]:
        t = torch.stack([v[k] for v in observed]).double()
        rnd[f"{k}_mean"] = num(t.nanmean())
        rnd[f"{k}_sd"] = num(_nanstd(t)) if len(observed) > 1 else None
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


def num(x) -> float | None:
    x = float(x)
    return None if x != x else x
