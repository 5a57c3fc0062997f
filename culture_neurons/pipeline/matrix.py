"""The ablation matrix's scores, ``[1 + S, n]`` (row 0 the full model, row 1 + s under set s),
as ``--matrix`` says (SPEC "Matrix modes"): one strategy per mode, all logging their groups of
items to the same resumable :class:`~culture_neurons.pipeline.group_log.GroupLog`.

- ``exact``: every item under every condition, groups of ``batch_size // 4`` items sharing
  forwards of ``batch_size`` rows (``progress/matrix.jsonl``);
- ``estimate``: the first-order estimate of every set at once, one forward and backward per
  batch of ``batch_size`` items (:mod:`culture_neurons.scoring.estimate`;
  ``progress/estimate.jsonl``);
- ``screen``: the estimate, then the cells :mod:`culture_neurons.pipeline.screen` confirms
  computed exactly, in groups of one culture's items, so that a cell costs its culture's
  prefills and no more, and larger in a round that confirms few cells on the culture
  (``progress/screen.jsonl``);
- ``sample``: every set on its own culture's items and on a share of every culture's items
  (:mod:`culture_neurons.scoring.sampled`), in groups of one culture's share or its other
  items (``progress/sample.jsonl``).

Items are grouped by prompt length (:mod:`culture_neurons.pipeline.batching`); the scores go
back to the items' order. The strategies read the run (:class:`~culture_neurons.pipeline.run.Run`:
model, task, settings, this process's part) and return the same scores a single process would.
"""

from __future__ import annotations

import torch

from culture_neurons.instrument import Instrument
from culture_neurons.instrument.attribution import items_within
from culture_neurons.masks import Masks
from culture_neurons.pipeline import batching, screen
from culture_neurons.pipeline.group_log import GroupLog
from culture_neurons.scoring import sampled as sampling
from culture_neurons.scoring.metrics import nan_to_none


def scores(run, items: list, combined: Masks, culture: torch.Tensor,
           masks: dict[str, Masks] | None = None):  # fmt: skip
    """``([1 + S, n] scores, record)`` as ``run.config.matrix`` says; ``record`` is
    :func:`screened`'s for ``screen`` (which needs ``masks``, combined's parts) or
    :func:`sampled`'s for ``sample``, else None."""
    mode = run.config.matrix
    if mode == "exact":
        return exact(run, items, combined), None
    if mode == "estimate":
        return estimate(run, items, combined), None
    if mode == "sample":
        return sampled(run, items, combined, culture)
    return screened(run, items, combined, culture, masks)


def sampled(run, items: list, combined: Masks, culture: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``--matrix sample`` (:mod:`culture_neurons.scoring.sampled`): every item under the
    full model and its own culture's sets, the share ``--sample-share`` of each culture's items
    under every set; the others stay the task's ``empty`` (not computed). ``([1 + S, n]
    scores, record)``, the record saying which items and what it cost."""
    C, S, share = len(run.cultures), len(combined), run.config.sample_share
    chosen = sampling.choose([it.id for it in items], culture, C, share, run.config.seed)
    strata = sampling.strata(chosen, culture)
    own = (torch.arange(S) % C)[:, None] == torch.arange(C)[None, :]  # [S, C]
    needed = torch.stack([own, torch.ones_like(own)], -1).reshape(S, 2 * C)  # [S, strata]
    preds = exact(run, items, combined, confirmed=needed, culture=strata, log="sample")
    counts = torch.bincount(culture, minlength=C)
    record = {"share": share, "seed": run.config.seed,
              "sampled_per_culture": torch.bincount(culture[chosen], minlength=C).tolist(),
              "items_per_culture": counts.tolist(),
              "prefills": len(items) + int(sampling.computed(chosen, culture, S, C).sum()),
              "exact_prefills": len(items) * (1 + S)}  # fmt: skip
    return preds, record


def screened(run, items: list, combined: Masks, culture: torch.Tensor,
             masks: dict[str, Masks]) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """``--matrix screen`` in rounds (:mod:`culture_neurons.pipeline.screen`): the estimate,
    the first cells, every mask with a cell that drifts confirmed whole, then, while a method's
    conclusions depend on the unconfirmed cells, half of its masks' remaining cells.
    ``([1 + S, n] scores, record)``, the record holding the estimate, the confirmed cells and
    what each round found."""
    from culture_neurons.selection.controls import rnd_draws_of

    C, S, task = len(run.cultures), len(combined), run.task
    names = list(masks)
    nulls = rnd_draws_of({m: masks[m] for m in run.config.methods if m in masks}, run.config)
    scaled = estimate(run, items, combined, tuple(screen.FILLS.values()))  # [1 + K * S, n]
    by_fill = {how: torch.cat([scaled[:1], scaled[1 + k * S : 1 + (k + 1) * S]])
               for k, how in enumerate(screen.FILLS)}  # fmt: skip

    def effect(scores: torch.Tensor) -> torch.Tensor:
        return task.effect(task.point(scores[0], scores[1:], items, culture, C, run.data))

    confirmed = screen.confirmed_cells(effect(by_fill["estimate"]), C, run.config.screen_budget)
    exact_cells = exact(run, items, combined, confirmed=confirmed, culture=culture)
    by_fill = {how: task.onto(e, exact_cells[0]) for how, e in by_fill.items()}
    estimated = by_fill["estimate"]
    first = effect(screen.combine(exact_cells, estimated, confirmed, culture)), effect(estimated)
    ratio, worst = screen.drift(*first, confirmed, C), screen.worst_cell(*first, confirmed, C)
    drifting = torch.nonzero(screen.drifts(worst)).flatten().tolist()
    more = screen.whole(drifting, S, C) & ~confirmed
    rounds = [{"confirmed": int(confirmed.sum()), "drifting": [names[i] for i in drifting]}]
    while True:
        if more.any():
            extra = exact(run, items, combined, confirmed=more, culture=culture,
                          round_=len(rounds))  # fmt: skip
            exact_cells = torch.cat([exact_cells[:1], torch.where(more[:, culture], extra[1:],
                                                                  exact_cells[1:])])  # fmt: skip
            confirmed = confirmed | more
        filled, effects = {}, []
        for how, e in by_fill.items():
            scores_ = screen.combine(exact_cells, e, confirmed, culture)
            per_set = {n: scores_[1 + i * C : 1 + (i + 1) * C] for i, n in enumerate(names)}
            filled[how] = task.results(masks, per_set, scores_[0], items, culture, run.cultures,
                                       run.data, nulls)[1]  # fmt: skip
            effects.append(effect(scores_))
        unsettled = screen.unsettled(filled)
        effects = torch.stack(effects)  # [fills, S, C]
        # how far the fills put each cell apart, plus the estimated effect (breaks ties)
        spread = effects.amax(0) - effects.amin(0) + effects[0]
        more = screen.next_cells(spread, confirmed, [names.index(n) for m in unsettled
                                                     for n in [m, *nulls[m]]], C)  # fmt: skip
        rounds[-1]["unsettled"] = unsettled
        if not more.any():
            break
        rounds.append({"confirmed": int(confirmed.sum() + more.sum())})
    record = {"estimated": estimated, "confirmed": confirmed, "rounds": rounds,
              "ratio": {n: screen.finite(float(r)) for n, r in zip(names, ratio, strict=True)},
              "worst_cell": {n: screen.finite(float(w)) for n, w in zip(names, worst, strict=True)},
              "prefills": len(items) + screen.prefills(confirmed, culture),
              "exact_prefills": len(items) * (1 + S), "estimated_items": len(items)}  # fmt: skip
    return screen.combine(exact_cells, estimated, confirmed, culture), record


def exact(run, items: list, combined: Masks, confirmed: torch.Tensor | None = None,
          culture: torch.Tensor | None = None, round_: int = 0,
          log: str = "screen") -> torch.Tensor:  # fmt: skip
    """[1 + S, n] exact scores. With ``confirmed`` [S, G] (``--matrix screen``: G cultures;
    ``sample``: G strata), each group (of one culture's or stratum's items: ``culture`` [n],
    indices) runs only the sets confirmed on it, and the full model in the first round
    (``round_`` 0); the other scores stay the task's ``empty`` and the log is
    ``<log>.jsonl`` (``<log>-<round_>.jsonl`` after the first)."""
    config, S, rows = run.config, len(combined), run.config.batch_size
    name = "matrix" if confirmed is None else log + (f"-{round_}" if round_ else "")
    full = confirmed is None or round_ == 0  # the full model: exact's row 0, screen's first round

    def conditions_of(where: list[int]) -> list[int]:
        if confirmed is None:
            return [-1] + list(range(S))
        return screen.conditions(confirmed, culture[where].tolist(), full=full)

    quarter = max(1, rows // 4)  # exact's groups: a quarter forward's items, 4 conditions each
    if confirmed is None:
        size, per_forward, grouping = quarter, rows // quarter, "by length"
    else:
        # Screen's groups hold one culture each: a set confirmed on one culture runs on its
        # items alone (a mixed group would run it on all, and again in the round confirming
        # the others). A culture needing fewer than 4 conditions (a later round) gets larger
        # groups, up to one forward of them all, and a small last group more conditions per
        # forward: fewer, fuller forwards (each group also costs an encoding and, where the
        # vision tower is reused, a forward of its own first condition).
        needs = [len(screen.conditions(confirmed, [g], full=full))
                 for g in range(confirmed.shape[1])]  # fmt: skip
        size = {g: max(quarter, rows // max(1, k)) for g, k in enumerate(needs)}
        per_forward, grouping = None, f"by culture and length, up to {rows} rows"
    key = run._key("ablation matrix", combined.content_hash(), config.cache_settings("matrix"),
                   size if confirmed is None else rows, per_forward, grouping,
                   None if confirmed is None else confirmed.tolist(),
                   None if confirmed is None else culture.tolist())  # fmt: skip

    with Instrument(run.model, masks=combined, backend=config.backend,
                    alpha=config.alpha) as ablator:  # fmt: skip

        def compute(chunk: list, where: list[int], bar) -> tuple[list[int], torch.Tensor]:
            conditions, group, out = conditions_of(where), run.task.group(chunk), []
            if not conditions:  # a later round with nothing to confirm on these items
                return [], run.task.empty((0, len(chunk)))
            step = per_forward or max(1, rows // len(chunk))
            for c0 in range(0, len(conditions), step):
                part = conditions[c0 : c0 + step]
                out.append(group.predict(part, ablator))
                bar.update(len(chunk) * len(part))
            return [c + 1 for c in conditions], torch.cat(out)

        return _logged(run, name, key, items, S, size, compute,
                       weight=lambda where: len(where) * len(conditions_of(where)),
                       rows_of=lambda where: [c + 1 for c in conditions_of(where)],
                       desc="ablation matrix", padding=f"ablation {name}",
                       group_of=culture if confirmed is not None else None)  # fmt: skip


def estimate(run, items: list, combined: Masks,
             scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
    """[1 + K * S, n] scores, row 0 the full model (exact: the forward the gradients come
    from), row 1 + k * S + s the first-order estimate under set s with its change x
    ``scales[k]`` (one forward and backward serve every set and scale)."""
    config, S = run.config, len(combined)
    rows = len(scales) * S
    key = run._key("estimated matrix", combined.content_hash(), config.cache_settings("estimate"),
                   "by length", list(scales))  # fmt: skip

    def compute(chunk: list, where: list[int], bar) -> tuple[list[int], torch.Tensor]:
        block = run.task.estimated(run.model, run.processor, chunk, combined, config.alpha,
                                   scales)  # fmt: skip
        bar.update(len(chunk))
        return list(range(1 + rows)), block

    return _logged(run, "estimate", key, items, rows, estimate_batch(run, items), compute,
                   weight=len, rows_of=lambda where: list(range(1 + rows)),
                   desc="estimated matrix (forward + backward)",
                   padding="estimated matrix")  # fmt: skip


def estimate_batch(run, items: list) -> int:
    """Items per estimate batch: ``--batch-size``, or fewer where ``--estimate-memory-gib``
    bounds the backward (:func:`~culture_neurons.instrument.attribution.items_within`, at the
    longest prompt, so every batch fits)."""
    config = run.config
    if config.estimate_memory_gib is None or not items:
        return config.batch_size
    return items_within(run.model, config.estimate_memory_gib * 2**30, max(run._lengths(items)),
                        config.batch_size, all_logits=run.task.estimate_all_logits)  # fmt: skip


def _logged(run, name: str, key: str, items: list, S: int, size: int | dict[int, int], compute,
            *, weight, rows_of, desc: str, padding: str,
            group_of: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[1 + S, n] scores filled group by group (``size`` items of similar length each; where
    ``size`` maps ``group_of``'s values (culture or stratum indices [n]) to sizes, of one value
    only: :func:`batching.groups`; this part's groups), each from ``progress/<name>.jsonl``
    where logged under ``key``, else by ``compute(chunk, where, bar) -> (rows, block [rows,
    len(where)])`` and logged."""
    preds = run.task.empty((1 + S, len(items)))
    order = batching.by_length(items, run._lengths(items))
    if group_of is None:
        every = batching.groups(items, order, size)
    else:  # each group's items together (stable: by length within)
        of = group_of.tolist()
        order = sorted(order, key=lambda i: of[i])
        every = batching.groups(items, order, size, key=lambda i: of[i])
    run._log_padding(padding, [[items[j] for j in where] for where in every])
    groups = [(g, where) for g, where in enumerate(every) if run.part.owns(g)]  # this part's
    path = run.out / "progress" / f"{name}{run.part.tag}.jsonl"
    with GroupLog(path, key, run.resume) as log, \
            run._bar(sum(weight(where) for _, where in groups), desc) as bar:  # fmt: skip
        for g, where in groups:
            chunk = [items[j] for j in where]
            ids = [it.id for it in chunk]
            rows = rows_of(where)
            block = log.done(g, ids, preds.dtype)
            if block is None:
                rows, block = compute(chunk, where, bar)
                block = block.to(preds.dtype)
                log.add(g, ids, block)
            else:
                bar.update(weight(where))
            if rows:
                preds[torch.tensor(rows)[:, None], torch.tensor(where)[None, :]] = block
    return gathered(run, preds)


def gathered(run, preds: torch.Tensor) -> torch.Tensor:
    """Every rank's scores: each filled its own groups, ``task.missing`` marks the others."""
    if run.part.ranks:
        for other in run.part.gather(preds):
            preds = torch.where(run.task.missing(preds), other, preds)
    return preds


def combine(masks: dict[str, Masks]) -> tuple[Masks, list[str]]:
    """One Masks holding every method's sets in order (set ids of a shared ablator)."""
    first = next(iter(masks.values()))
    names, sets = [], []
    for name, m in masks.items():
        for s in range(len(m)):
            names.append(f"{name}:{m.names[s]}")
            sets.append(m.flat_of(s))
    return Masks.from_sets(names, sets, first.fingerprint, method="combined"), list(masks)


def add_screened(run, results: dict, screened: dict, names: list[str], full, items,
                 culture) -> None:  # fmt: skip
    """``--matrix screen``: each method's JSON gains ``confirmed`` [S][C] (cells computed
    exactly; the others are estimated), ``estimate`` (every matrix as the estimate alone
    gives it, so both stand side by side where a cell was confirmed) and ``screen`` (what
    the rounds found: each mask's drift ratio and its most-off cell, the methods confirmed
    whole and why, the cost in item-condition prefills against the exact matrix's)."""
    estimated, confirmed = screened["estimated"], screened["confirmed"]
    C = len(run.cultures)
    point = run.task.point(full, estimated[1:], items, culture, C, run.data)
    for name, res in results.items():
        first = names.index(name) * C  # its sets' rows (see combine)
        rows = slice(first, first + C)
        res["screen_budget"] = run.config.screen_budget
        res["confirmed"] = confirmed[rows].tolist()
        res["estimate"] = {k: nan_to_none(point[k][rows].tolist())
                           for k in run.task.matrix_keys if point.get(k) is not None}  # fmt: skip
        own = [name, *(res.get("rnd") or {}).get("masks", [])]
        res["screen"] = {
            "drift_limit": screen.DRIFT_LIMIT, "level": screen.LEVEL,
            "point_share": screen.POINT_SHARE, "fills": list(screen.FILLS),
            "ratio": {m: screened["ratio"][m] for m in own},  # exact / estimated effect
            "worst_cell": {m: screened["worst_cell"][m] for m in own},  # the most off cell
            "whole": [m for m in own  # confirmed whole: drifting, or a conclusion depended on it
                      if bool(confirmed[names.index(m) * C : (names.index(m) + 1) * C].all())],
            "rounds": screened["rounds"], "prefills": screened["prefills"],
            "exact_prefills": screened["exact_prefills"],
            "estimated_items": screened["estimated_items"],
        }  # fmt: skip
