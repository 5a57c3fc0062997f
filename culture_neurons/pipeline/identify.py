"""Steps 1 and 2 of a run: the identification items and their statistics (SPEC "The
science"), checkpointed by wall time and resumable.

Where :func:`one_pass` (``identify_on="correct"`` scored from the prompt's logits), each batch is
prefilled once: its forward scores the items and stages their statistics per item
(``Instrument.set_batch(stage=True)``), and the items answered right are committed once the
logits are known. Otherwise the correct items are found first (the full model's predictions,
cached in ``progress/ident_full.json``) and recorded in a second prefill, or (``all``) every
item is recorded. With ``halves`` (the default) every item's rows go to its culture's half
group (:mod:`culture_neurons.pipeline.halves`): 2C groups in the same forwards, whose sum is
the run's statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from culture_neurons.errors import DataError, UsageError
from culture_neurons.instrument import Instrument
from culture_neurons.pipeline import halves, rundir
from culture_neurons.pipeline.rundir import write_json
from culture_neurons.stats import Stats, load_stats

log = logging.getLogger(__name__)


class Checkpoints:
    """When identification statistics are checkpointed: once ``minutes`` of wall time have
    passed since the last one, and, if ``batches`` > 0, every ``batches`` batches.

    A checkpoint copies the totals to the host and writes them: at paper scale 25 cultures x
    28 layers x 18944 neurons x 24 bytes (K, S, Q) = 318 MB, measured at 4-6 s on the 2-core
    CPU box (2 s to gather, 2-4.5 s to write; on a GPU node the copy is ~30 ms). Every 20
    batches, the old default, that was the cost of ~10 s of 7B prefills (20 x 8 prompts):
    up to half the run. Every 10 minutes (the default) it is ~1 % of the run at most, and a
    crash loses at most 10 minutes of recording.
    """

    def __init__(self, minutes: float, batches: int = 0,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.minutes, self.batches, self.clock = minutes, batches, clock
        self.last = clock()

    def due(self, batches_done: int) -> bool:
        if self.batches > 0 and batches_done % self.batches == 0:
            return True
        return self.minutes > 0 and self.clock() - self.last >= 60 * self.minutes

    def saved(self) -> None:
        self.last = self.clock()


def one_pass(config) -> bool:
    """Whether the forward that scores an identification item also records it (one prefill
    per item; only the items answered right are committed): where the correct items are kept
    and the answer comes from the prompt's logits. Generation scoring runs a forward per new
    token after the prompt's, so it finds the correct items first and records them in a second
    prefill; ``identify_on="all"`` needs no answer at all."""
    return config.identify_on == "correct" and config.scoring == "logits"


def identification_items(run) -> list:
    """This part's identification items in recording order, grouped by prompt length
    within each culture (:mod:`culture_neurons.pipeline.batching`): every item where
    :func:`one_pass` (the correct ones are committed as they are scored), else the items
    whose statistics are recorded: the correct ones, found by a first pass, or all.

    Two-pass ``identify_on="correct"``: ranks share their predictions, so that the correct
    items are batched exactly as in one process; a ``--shard`` job cannot see the other
    shards' predictions and batches its own correct items among themselves.
    """
    bs = run.config.batch_size
    everything = run._by_length([it for c in run.cultures
                                  for it in run.ident.items_by_culture[c]])  # fmt: skip
    mine = run.part.mine(everything, bs)
    if run.config.identify_on == "all" or one_pass(run.config):
        return mine
    preds = full_predictions(run, mine)
    if run.part.sharded and not run.part.ranks:
        return [it for it in mine if preds[it.id] == it.label]
    for other in run.part.gather(preds):  # ranks: everyone's ([preds] in one process)
        preds.update(other)
    correct = [it for it in everything if preds[it.id] == it.label]
    if not correct:
        raise nothing_correct()
    return run.part.mine(correct, bs)


def _predictions_key(run, items: list) -> str:
    return run._key("identification predictions", run.config.cache_settings("predictions"),
                    [it.id for it in items])  # fmt: skip


def full_predictions(run, items: list) -> dict[str, int]:
    """``{item id: predicted letter}`` of the full model (cached in progress/)."""
    path = run.out / "progress" / f"ident_full{run.part.tag}.json"
    key = _predictions_key(run, items)
    cached = run._cached(path, key)
    if cached is not None:
        return dict(cached["preds"])
    with run._bar(len(items), "full model (identification half)") as bar:
        pred = run.task.predict(items, run.config.batch_size, progress=bar.update)
    preds = {it.id: int(p) for it, p in zip(items, pred.tolist(), strict=True)}
    write_json(path, {"key": key, "preds": preds})
    return preds


def record(run) -> Stats:
    """Statistics of the identification items (module doc); checkpointed, resumable. A
    checkpoint holds the committed statistics and (:func:`one_pass`) the predictions so far;
    ``progress/ident_full.json`` all the predictions at the end."""
    items = identification_items(run)
    single = one_pass(run.config)
    options = {"items": run.config.identify_on, "split_ratio": run.config.split_ratio,
               "seed": run.config.seed}  # fmt: skip
    ckpt_dir = run.out / "progress" / f"stats{run.part.tag}"
    key = run._key("identification statistics", run.config.cache_settings("statistics"),
                   [it.id for it in items])  # fmt: skip
    done, prior, preds = 0, None, {}
    if run._cached(ckpt_dir / "stats.json", key) is not None:
        try:
            prior = load_stats(ckpt_dir)
            meta = rundir.read_json(ckpt_dir / "stats.json")
            done, preds = meta["batches_done"], dict(meta.get("preds", {}))
        except DataError as e:
            log.info("the statistics checkpoint is unreadable (%s): recording again", e)
            prior, done, preds = None, 0, {}
    bs = run.config.batch_size
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    run._log_padding("identification", batches)
    device = next(run.model.parameters()).device
    split = run.config.halves  # record 2C half groups, the whole their sum (pipeline.halves)
    groups = halves.group_names(run.cultures) if split else run.cultures
    with Instrument(run.model, groups, activation=run.config.activation,
                    scope=run.config.scope, backend=run.config.backend,
                    options=options) as rec, torch.no_grad(), \
            run._bar(len(items), "identification (score + record)" if single
                      else "recording statistics") as bar:  # fmt: skip
        if prior is not None:  # continue the same sums in the same order: identical results
            rec.start_from(prior)
        bar.update(sum(len(b) for b in batches[:done]))
        checkpoints = Checkpoints(run.config.checkpoint_minutes, run.config.checkpoint_every)
        for i in range(done, len(batches)):
            chunk = batches[i]
            culture = [run.cultures.index(it.culture) for it in chunk]
            if split:
                culture = halves.group_ids(culture, [it.id for it in chunk])
            if single:
                pred = run.task.group(chunk).predict_staged(rec, culture)
                rec.commit(pred == torch.tensor([it.label for it in chunk]))
                preds.update((it.id, int(p)) for it, p in zip(chunk, pred.tolist(),
                                                              strict=True))  # fmt: skip
            else:
                rec(culture, **run.task.encode(chunk, device))
            bar.update(len(chunk))
            if i + 1 < len(batches) and checkpoints.due(i + 1):
                extra = {"batches_done": i + 1, "key": key}
                rec.stats().save(ckpt_dir, extra={**extra, "preds": preds} if single
                                 else extra)  # fmt: skip
                checkpoints.saved()
        stats = rec.stats()
    if single:  # which items counted, for the record (and as a two-pass run caches them)
        write_json(run.out / "progress" / f"ident_full{run.part.tag}.json",
                   {"key": _predictions_key(run, items), "preds": preds})  # fmt: skip
    if run.part.ranks:
        stats = run.part.all_reduce_stats(stats)
    elif run.part.sharded:
        stats.shard = (run.part.index, run.part.count)
    groups = None
    if split:
        groups, stats = stats, halves.fold(stats, run.cultures)
    if single and stats.shard is None and int(stats.items.sum()) == 0:
        raise nothing_correct()  # (a shard alone may hold none: the merge tells)
    if run.part.main:
        if groups is not None:
            halves.save(groups, run.out)
        stats.save(run.out, extra={"items_counted": int(stats.items.sum())})
    return stats


def nothing_correct() -> UsageError:
    return UsageError("no identification item is left: the full model answers none of them "
                      "correctly; start again with --identify-on all --overwrite")  # fmt: skip
