"""The tests of a run's conclusions, computed from per-item changes alone (SPEC "Uncertainty and
controls"), so that ``evaluate`` and ``report`` compute them the same way and a ``report`` after a
change of test recomputes them without the model.

``OUT/eval/items.safetensors`` keeps what they need: ``culture`` [n], ``full`` [n] (the full
model's scores: MC letter index, LM summed NLL), ``scores.<mask>`` [C, n] for every method and
RND draw, and ``labels`` [n] (MC with labels) or ``tokens`` [n] (LM).

Per method and measure (``delta``: accuracy points or NLL nats/token; ``flip``), from
:func:`culture_neurons.compare_to_random`: ``p_<prefix>gap_vs_rnd`` (row recombination against
its own RND draws), the oriented ``<prefix>specificity`` and ``p_<prefix>specificity_vs_rnd``
(against the draws, or the uniform share 1/C where they do nothing: ``tests`` says which), each
test's details under ``tests``. One **primary** measure per task (MC with labels: ``gap``;
hidden labels: ``flip_gap``; LM: ``gap``), its p Holm-adjusted across the run's methods
(``p_<primary>_vs_rnd_adj``); every other p is secondary, unadjusted. Delta matrix cells:
``delta_cell_p`` (sign-flip / exact sign test per cell) and ``delta_cell_q`` (BH across the
matrix): a report bolds a cell only where q < 0.05.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from culture_neurons.errors import DataError
from culture_neurons.eval_schema import measures_of, primary
from culture_neurons.scoring.multiplicity import benjamini_hochberg, cell_p, holm
from culture_neurons.scoring.random_control import HIGHER, LOWER, TWO_SIDED, compare_to_random
from culture_neurons.tasks import task_class

ITEMS_FILE = "eval/items.safetensors"
SIGNS = {"lower": LOWER, "higher": HIGHER, "either": TWO_SIDED}
SECONDARY = "secondary, unadjusted"


def save_items(out: Path, per_set: dict, full: torch.Tensor, culture: torch.Tensor,
               extra: dict) -> Path:  # fmt: skip
    """Write ``eval/items.safetensors`` (see the module doc); ``extra``: labels or tokens."""
    tensors = {"culture": culture.long(), "full": full.contiguous()}
    tensors |= {f"scores.{name}": s.contiguous() for name, s in per_set.items()}
    tensors |= {k: v.contiguous() for k, v in extra.items() if v is not None}
    path = Path(out) / ITEMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def load_items(out: Path) -> dict:
    path = Path(out) / ITEMS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: this run was evaluated before per-item changes were "
                        f"kept; evaluate again: culture-neurons evaluate --out {out}")  # fmt: skip
    return load_file(str(path))


def changes(task: str | None, full: torch.Tensor, scores: torch.Tensor, culture: torch.Tensor,
            C: int, labels=None, tokens=None) -> dict:  # fmt: skip
    """Per-item changes ``{measure key: [S, n]}`` of scores [S, n] against ``full`` [n], each
    such that a culture's plain mean is its matrix cell, as task ``task`` defines them (its
    ``changes``; ``labels`` / ``tokens``: what it needs of the items)."""
    data = {k: v for k, v in (("labels", labels), ("tokens", tokens)) if v is not None}
    return task_class(task).changes(full, scores, culture, C, data)


def primary_key(res: dict) -> str:
    """The summary key of the task's one primary measure (module doc)."""
    return primary(res).summary("gap")


def add_tests(results: dict, per_item: dict, culture: torch.Tensor, seed: int = 0) -> None:
    """Fill every method's tests into ``results`` ``{method: eval JSON}`` in place.

    Args:
        per_item: ``{mask name: {measure: [C, n] per-item changes}}`` (:func:`changes`), for
            every method and RND draw.
        culture: int64 [n].
        seed: of the Monte Carlo draws (recombinations, permutations, sign flips).
    """
    for name, res in results.items():
        C = len(res["cultures"])
        draws = (res.get("rnd") or {}).get("masks") or []
        res["tests"], res["p_resolution"] = {}, None
        for measure in measures_of(res):
            key = measure.key
            sign = SIGNS[(res.get("direction") or {}).get(measure.summary("gap"), "higher")]
            method = per_item[name][key]
            null = torch.stack([per_item[d][key] for d in draws]) if draws else None
            if null is not None:
                gap = compare_to_random(method, null, culture, "gap", sign, C=C, seed=seed)
                res[measure.p("gap")] = _num(gap.p)
                res["p_resolution"] = gap.p_floor  # the smallest p the recombination can give
                res["tests"][measure.summary("gap")] = gap.as_dict() | {"role": SECONDARY}
            spec = compare_to_random(method, null if null is not None else
                                     torch.zeros(0, *method.shape), culture, "specificity",
                                     sign, C=C, seed=seed)  # fmt: skip
            res[measure.summary("specificity")] = _num(spec.value)
            if spec.test == "undefined":
                res[measure.ci("specificity")] = None
            res[measure.p("specificity")] = _num(spec.p)
            res["tests"][measure.summary("specificity")] = spec.as_dict() | {"role": SECONDARY}
            if measure.cells_tested:
                p = cell_p(method, culture, C, seed=seed)
                res[measure.cell_p()] = _nested(p)
                res[measure.cell_q()] = _nested(benjamini_hochberg(p))
    _adjust_primary(results)


def _adjust_primary(results: dict) -> None:
    """Holm across the run's methods on each one's primary p."""
    names = list(results)
    measures = [primary(results[m]) for m in names]
    ps = [results[m].get(pm.p("gap")) for m, pm in zip(names, measures, strict=True)]
    adjusted = holm(ps)
    for m, pm, p, q in zip(names, measures, ps, adjusted, strict=True):
        res, k = results[m], pm.summary("gap")
        res[pm.p_adjusted("gap")] = q
        res["primary"] = {"measure": k, "p": p, "p_adj": q, "adjustment":
                          f"Holm-adjusted across the run's {sum(x is not None for x in ps)} methods"}
        if k in res.get("tests", {}):
            res["tests"][k]["role"] = "primary, Holm-adjusted"


def retest(out: Path, results: dict) -> None:
    """Recompute the tests of ``results`` (the run's eval JSONs) from ``eval/items.safetensors``
    (no model), in place."""
    retest_items(load_items(out), results)


def retest_items(items: dict, results: dict, columns: torch.Tensor | None = None) -> None:
    """:func:`retest` from the kept items already loaded (:func:`load_items`); with ``columns``
    (int64 item indices, repeats allowed), on those items only, as if they were the evaluation
    set (a bootstrap replicate of it, say)."""
    if columns is not None:
        items = {k: v[..., columns] for k, v in items.items()}  # every tensor's last dim: items
    culture = items["culture"]
    first = next(iter(results.values()))
    task, C = first.get("task"), len(first["cultures"])
    full = items["full"]
    per_item = {k.removeprefix("scores."): changes(task, full, v, culture, C,
                                                  items.get("labels"), items.get("tokens"))
                for k, v in items.items() if k.startswith("scores.")}  # fmt: skip
    seed = first.get("bootstrap_seed") or 0
    add_tests(results, per_item, culture, seed=seed % 2**32)


def retest_run(out: Path) -> list[str]:
    """``report``'s step: recompute the tests of every ``eval/<method>.json`` of the run in
    ``out`` from its kept per-item scores and write them back; the methods retested (none
    when the run kept no per-item scores: evaluated by an older version)."""
    from culture_neurons.pipeline.rundir import read_json, write_json

    out = Path(out)
    if not (out / ITEMS_FILE).is_file():
        return []
    paths = {p.stem: p for p in sorted((out / "eval").glob("*.json")) if p.stem != "full"}
    results = {m: read_json(p, "run `evaluate` again") for m, p in paths.items()}
    results = {m: r for m, r in results.items() if r and "cultures" in r}
    if results:
        retest(out, results)
        for m, r in results.items():
            write_json(paths[m], r)
    return list(results)


def _num(x) -> float | None:
    x = float(x)
    return None if x != x else x


def _nested(a) -> list:
    return [[None if v != v else float(v) for v in row] for row in a.tolist()]
