"""The whole experiment (SPEC "The science"), as resumable steps writing SPEC's output layout.

    full model on the identification half  ->  statistics of its (correct) items  ->  every
    selector  ->  every culture's evaluation half under every method's every culture set
    (+ each method's size-matched RND draws), rows of many sets sharing batches, ablated or
    steered  ->  matrices, summaries, bootstrap intervals, p-values against RND  ->  report.

Cost: the matrix runs ``1 + C * (methods + groups * rnd_draws)`` conditions over the
evaluation items, where ``groups`` is the number of distinct set-size vectors among the
methods (methods of identical sizes share their RND draws). ``matrix="estimate"`` replaces
them by one forward and backward per batch of items (:mod:`culture_neurons.scoring.estimate`);
``matrix="screen"`` adds exact conditions for the cells :mod:`culture_neurons.pipeline.screen`
confirms.

Two tasks share these steps (``RunConfig.task``, see :mod:`culture_neurons.pipeline.tasks`):
``mc``, multiple-choice questions scored by their letter, and ``lm``, plain sentences scored
by their next-token NLL. A task says how items become a batch, how a group of items is scored
under many conditions, and how the scores become ``eval/<method>.json``; everything else is
the same code.

Every step leaves its result in ``OUT`` (``stats.*``, ``masks/``, ``eval/``) and its progress
in ``OUT/progress``: identification statistics are checkpointed atomically by wall time (every
``checkpoint_minutes``, see :class:`Checkpoints`) and evaluation groups are appended as they
finish, so a run stopped anywhere (Ctrl-C, kill -9) continues with ``resume=True`` and ends with
the same numbers as an uninterrupted one. Progress is keyed on the model (fingerprint and dtype), the items and the masks' content
(:func:`culture_neurons.pipeline.rundir.digest`): what was computed under another key is
computed again, never mixed in. ``OUT/run.json`` holds the run's settings; see
:mod:`culture_neurons.pipeline.rundir` for how later steps agree with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from culture_neurons.data import stable_seed
from culture_neurons.errors import DataError, StatsMismatchError, UsageError
from culture_neurons.instrument import Instrument
from culture_neurons.masks import Masks, load_masks
from culture_neurons.models import adapters, image_budget
from culture_neurons.pipeline import batching, progress, retest, rundir, screen
from culture_neurons.pipeline.config import RunConfig, identify_on_for
from culture_neurons.pipeline.distributed import Partition
from culture_neurons.pipeline.rundir import RUN_FILE, write_json
from culture_neurons.pipeline.tasks import TASKS
from culture_neurons.scoring.estimate import estimated_predictions
from culture_neurons.scoring.metrics import nan_to_none
from culture_neurons.scoring.multiple_choice import predict
from culture_neurons.selection import select
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


@dataclass
class Run:
    """One experiment in one output dir; each step can run alone (the CLI's commands)."""

    model: torch.nn.Module
    processor: object
    data: object  # culture_neurons.data.CultureData
    out: Path
    config: RunConfig = field(default_factory=RunConfig)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    description: str = ""  # what model and data these are, for the report
    part: Partition = field(default_factory=Partition)  # this process's share of the items
    inputs: dict = field(default_factory=dict)  # how the command line loaded model and data
    command: str = "run"  # the step run.json's ``changes`` name

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.cultures = list(self.data.cultures)
        identify_on_for(self.config.identify_on, self.data.labels_available, self.config.task)
        self.fingerprint = adapters.fingerprint(self.model)
        # Not part of the fingerprint (one model in fp32 or bf16), but of every cached result.
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.data_hash = rundir.data_hash(self.data)
        # After the fingerprint: a budget changes how images are tiled, not which model it is.
        self.image_budget = image_budget.apply(self.model, self.processor,
                                               self.config.max_image_tokens)  # fmt: skip
        self.ident, self.evaluation = self.data.split(self.config.split_ratio, self.config.seed)
        self.task = TASKS[self.config.task](self.model, self.processor, self.config)
        self._length_of: dict[str, int] = {}  # item id -> prompt tokens (see _lengths)
        if self.part.main:
            self._prepare_dir()
        self.part.barrier()

    # -- output dir ----------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        """Check ``OUT`` against this run (refusing before anything is written), then write
        run.json: settings changed since the run began are recorded in its ``changes``."""
        meta = {
            "config": self.config.settings(),
            "inputs": dict(self.inputs),
            "cultures": self.cultures,
            "fingerprint": asdict(self.fingerprint),
            "data": getattr(self.data, "source", ""),
            "data_hash": self.data_hash,
            "changes": [],
        }
        rundir.check_start(self.out, self.resume, self.overwrite)
        if self.overwrite:
            rundir.remove(self.out, rundir.RESULTS)
        elif self.resume and rundir.present(self.out):
            old = rundir.read_run(self.out)
            if old is None:  # results without run.json (statistics saved from Python, merged)
                old = {"config": rundir.settings_from_stats(
                    rundir.read_json(self.out / "stats.json") or {})}  # fmt: skip
            rundir.check_same_run(self.out, old, cultures=self.cultures,
                                  data_hash=self.data_hash, fingerprint=self.fingerprint)  # fmt: skip
            rundir.refuse(self.out, rundir.conflicts(old["config"], meta["config"], "run"), {})
            meta["changes"] = old.get("changes", []) + rundir.changes(
                old["config"], meta["config"], self.command)  # fmt: skip
            meta["inputs"] = {**old.get("inputs", {}), **self.inputs}
        try:
            (self.out / "progress").mkdir(parents=True, exist_ok=True)
            write_json(self.out / RUN_FILE, meta)
        except OSError as e:
            raise UsageError(f"cannot write to output dir {self.out} ({e.strerror}); "
                             "choose a writable --out") from e  # fmt: skip

    def _bar(self, total: int, desc: str):
        return progress.bar(total, desc, enabled=self.progress and self.part.main)

    def _key(self, *parts) -> str:
        """The key of a cached result: this model (weights and dtype), its image-token budget
        (every prompt's tokens) and ``parts``."""
        return rundir.digest(asdict(self.fingerprint), self.dtype, self.config.max_image_tokens,
                             *parts)  # fmt: skip

    def _cached(self, path: Path, key: str) -> dict | None:
        """The JSON progress file ``path`` if it was written under ``key`` (and resuming)."""
        if not self.resume or not path.exists():
            return None
        try:
            cached = rundir.read_json(path)
        except DataError:
            cached = None
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached
        log.info("%s was computed for another model, other items or settings: computing it "
                 "again", path.relative_to(self.out))  # fmt: skip
        return None

    # -- step 1: the identification items -------------------------------------------------
    @property
    def one_pass(self) -> bool:
        """Whether the forward that scores an identification item also records it (one
        prefill per item; only the items answered right are committed): where the correct
        items are kept and the answer comes from the prompt's logits. Generation scoring runs
        a forward per new token after the prompt's, so it finds the correct items first and
        records them in a second prefill; ``identify_on="all"`` needs no answer at all."""
        return self.config.identify_on == "correct" and self.config.scoring == "logits"

    def identification_items(self) -> list:
        """This part's identification items in recording order, grouped by prompt length
        within each culture (:mod:`culture_neurons.pipeline.batching`): every item where
        :attr:`one_pass` (the correct ones are committed as they are scored), else the items
        whose statistics are recorded: the correct ones, found by a first pass, or all.

        Two-pass ``identify_on="correct"``: ranks share their predictions, so that the correct
        items are batched exactly as in one process; a ``--shard`` job cannot see the other
        shards' predictions and batches its own correct items among themselves.
        """
        bs = self.config.batch_size
        everything = self._by_length([it for c in self.cultures
                                      for it in self.ident.items_by_culture[c]])  # fmt: skip
        mine = self.part.mine(everything, bs)
        if self.config.identify_on == "all" or self.one_pass:
            return mine
        preds = self._full_predictions(mine)
        if self.part.sharded and not self.part.ranks:
            return [it for it in mine if preds[it.id] == it.label]
        for other in self.part.gather(preds):  # ranks: everyone's ([preds] in one process)
            preds.update(other)
        correct = [it for it in everything if preds[it.id] == it.label]
        if not correct:
            raise _nothing_correct()
        return self.part.mine(correct, bs)

    def _by_length(self, items: list) -> list:
        """``items`` in batching order (see :func:`batching.by_length`)."""
        lengths = self._lengths(items)
        return [items[i] for i in batching.by_length(items, lengths)]

    def _lengths(self, items: list) -> list[int]:
        """Prompt lengths of ``items``, each computed once per run."""
        missing = [it for it in items if it.id not in self._length_of]
        if missing:
            self._length_of.update(zip([it.id for it in missing],
                                       self.task.lengths(missing), strict=True))  # fmt: skip
        return [self._length_of[it.id] for it in items]

    def _token_summary(self, items: list) -> dict:
        """Prompt and image tokens per item of ``items`` (mean, max) and the image tokens'
        share of all prompt tokens, padding aside (image tokens None where the processor
        cannot count them from sizes, or there are no images)."""
        prompt = torch.tensor(self._lengths(items), dtype=torch.float64)
        out = {"items": len(items), "prompt_mean": float(prompt.mean()),
               "prompt_max": int(prompt.max()), "image_mean": None, "image_max": None,
               "image_share": None}  # fmt: skip
        counts = image_budget.image_tokens(self.model, self.processor,
                                           [it.image_size for it in items]) \
            if items and adapters.get_adapter(self.model).vlm else None  # fmt: skip
        if counts:
            image = torch.tensor(counts, dtype=torch.float64)
            out.update(image_mean=float(image.mean()), image_max=int(image.max()),
                       image_share=float(image.sum() / prompt.sum()))  # fmt: skip
        return out

    def _log_padding(self, what: str, items: list, rows: int) -> None:
        share = batching.padding_share(self._lengths(items), rows)
        log.info("%s: %d prompts, %d per forward, %.1f %% of the prefilled rows are padding",
                 what, len(items), rows, 100 * share)  # fmt: skip

    def _predictions_key(self, items: list) -> str:
        return self._key("identification predictions", self.config.scoring,
                         self.config.batch_size, [it.id for it in items])  # fmt: skip

    def _full_predictions(self, items: list) -> dict[str, int]:
        """``{item id: predicted letter}`` of the full model (cached in progress/)."""
        path = self.out / "progress" / f"ident_full{self.part.tag}.json"
        key = self._predictions_key(items)
        cached = self._cached(path, key)
        if cached is not None:
            return dict(cached["preds"])
        with self._bar(len(items), "full model (identification half)") as bar:
            pred = predict(self.model, self.processor, items, batch_size=self.config.batch_size,
                           scoring=self.config.scoring, progress=bar.update)  # fmt: skip
        preds = {it.id: int(p) for it, p in zip(items, pred.tolist(), strict=True)}
        write_json(path, {"key": key, "preds": preds})
        return preds

    # -- step 2: statistics ------------------------------------------------------------------
    def identify(self) -> Stats:
        """Record statistics on the identification items; checkpointed, resumable.

        Where :attr:`one_pass`, each batch is prefilled once: its forward scores the items
        and stages their statistics per item (``Instrument.set_batch(stage=True)``), and the
        items answered right are committed once the logits are known. A checkpoint holds the
        committed statistics and the predictions so far; ``progress/ident_full.json`` all the
        predictions at the end.
        """
        items = self.identification_items()
        one_pass = self.one_pass
        options = {"items": self.config.identify_on, "split_ratio": self.config.split_ratio,
                   "seed": self.config.seed}  # fmt: skip
        ckpt_dir = self.out / "progress" / f"stats{self.part.tag}"
        key = self._key("identification statistics", self.config.identify_on,
                        self.config.scoring, self.config.batch_size,
                        [it.id for it in items])  # fmt: skip
        done, prior, preds = 0, None, {}
        if self._cached(ckpt_dir / "stats.json", key) is not None:
            try:
                prior = load_stats(ckpt_dir)
                meta = rundir.read_json(ckpt_dir / "stats.json")
                done, preds = meta["batches_done"], dict(meta.get("preds", {}))
            except DataError as e:
                log.info("the statistics checkpoint is unreadable (%s): recording again", e)
                prior, done, preds = None, 0, {}
        bs = self.config.batch_size
        batches = [items[i : i + bs] for i in range(0, len(items), bs)]
        self._log_padding("identification", items, bs)
        device = next(self.model.parameters()).device
        with Instrument(self.model, self.cultures, activation=self.config.activation,
                        scope=self.config.scope, backend=self.config.backend,
                        options=options) as rec, torch.no_grad(), \
                self._bar(len(items), "identification (score + record)" if one_pass
                          else "recording statistics") as bar:  # fmt: skip
            if prior is not None:  # continue the same sums in the same order: identical results
                rec.start_from(prior)
            bar.update(sum(len(b) for b in batches[:done]))
            checkpoints = Checkpoints(self.config.checkpoint_minutes, self.config.checkpoint_every)
            for i in range(done, len(batches)):
                chunk = batches[i]
                culture = [self.cultures.index(it.culture) for it in chunk]
                if one_pass:
                    pred = self.task.group(chunk).predict_staged(rec, culture)
                    rec.commit(pred == torch.tensor([it.label for it in chunk]))
                    preds.update((it.id, int(p)) for it, p in zip(chunk, pred.tolist(),
                                                                  strict=True))  # fmt: skip
                else:
                    rec(culture, **self.task.encode(chunk, device))
                bar.update(len(chunk))
                if i + 1 < len(batches) and checkpoints.due(i + 1):
                    extra = {"batches_done": i + 1, "key": key}
                    rec.stats().save(ckpt_dir, extra={**extra, "preds": preds} if one_pass
                                     else extra)  # fmt: skip
                    checkpoints.saved()
            stats = rec.stats()
        if one_pass:  # which items counted, for the record (and as a two-pass run caches them)
            write_json(self.out / "progress" / f"ident_full{self.part.tag}.json",
                       {"key": self._predictions_key(items), "preds": preds})  # fmt: skip
        if self.part.ranks:
            stats = self.part.all_reduce_stats(stats)
        elif self.part.sharded:
            stats.shard = (self.part.index, self.part.count)
        if one_pass and stats.shard is None and int(stats.items.sum()) == 0:
            raise _nothing_correct()  # (a shard alone may hold none: the merge tells)
        if self.part.main:
            stats.save(self.out, extra={"items_counted": int(stats.items.sum())})
        return stats

    # -- step 3: selection ------------------------------------------------------------------
    def select(self, stats: Stats | None = None) -> dict[str, Masks]:
        """Every method's masks (``masks/<method>.safetensors``) and their RND draws."""
        stats = stats if stats is not None else load_stats(self.out)
        stats.require_model(self.fingerprint, "the statistics in " + str(self.out))
        return select_all(stats, self.config, self.out if self.part.main else None)

    def load_masks(self) -> dict[str, Masks]:
        """The run's masks from ``OUT/masks`` (every method's, then their RND draws, as
        :func:`select_all` names them); refused if selected with other settings."""
        masks = {n: self._load_mask(n) for n in self.config.methods}
        for names in rnd_draws_of(masks, self.config).values():
            masks.update({n: self._load_mask(n) for n in names if n not in masks})
        return masks

    def _load_mask(self, name: str) -> Masks:
        m = load_masks(self.out / "masks" / f"{name}.safetensors", self.fingerprint)
        rundir.check_masks(self.out, name, m, self.config)
        return m

    # -- step 4: the ablation matrices ------------------------------------------------------
    def evaluate(self, masks: dict[str, Masks] | None = None) -> dict[str, dict]:
        """Every evaluation item under the full model and under every set of every method."""
        masks = masks if masks is not None else self.load_masks()
        for name, m in masks.items():
            if m.names != self.cultures:
                raise StatsMismatchError(
                    f"masks {name!r} are for cultures {m.names}, this run has {self.cultures}"
                )
        combined, names = _combine(masks)
        items = [it for c in self.cultures for it in self.evaluation.items_by_culture[c]]
        C = len(self.cultures)
        culture = torch.tensor([self.cultures.index(it.culture) for it in items])
        preds, screened = self._predictions(items, combined, culture)  # [1 + S_total, n]
        if not self.part.main:
            return {}
        # row 0 is the full model, then C rows (one per culture's set) of each mask in turn
        per_set = {name: preds[1 + i * C : 1 + (i + 1) * C] for i, name in enumerate(names)}
        methods = {m: masks[m] for m in self.config.methods if m in masks}
        nulls = rnd_draws_of(methods, self.config)
        missing = sorted({n for draws in nulls.values() for n in draws} - set(masks))
        if missing:
            raise UsageError(f"the RND draws {', '.join(missing)} are missing from the masks; "
                             f"select again: culture-neurons select --out {self.out} "
                             "--overwrite")  # fmt: skip
        full_record, results = self.task.results(masks, per_set, preds[0], items, culture,
                                                 self.cultures, self.data, nulls)  # fmt: skip
        full_record["matrix"] = self.config.matrix
        full_record["input_tokens"] = {"budget": self.image_budget,
                                 "evaluation": self._token_summary(items),
                                 "identification": self._token_summary(
                                     [it for c in self.cultures
                                      for it in self.ident.items_by_culture[c]])}  # fmt: skip
        if screened is not None:
            self._add_screened(results, screened, names, preds[0], items, culture)
        write_json(self.out / "eval" / "full.json", full_record)
        extra = {k: torch.tensor(full_record[k]) for k in ("label", "tokens")
                 if full_record.get(k) is not None}  # fmt: skip
        retest.save_items(self.out, per_set, preds[0], culture,
                          {"labels" if k == "label" else k: v for k, v in extra.items()})
        hashes = {n: m.content_hash() for n, m in masks.items()}
        for name, res in results.items():
            # Which masks these numbers belong to (``report`` refuses them under others).
            res["masks_hash"] = {n: hashes[n] for n in [name, *nulls[name]]}
            write_json(self.out / "eval" / f"{name}.json", res)
        return results

    def _predictions(self, items: list, combined: Masks,
                     culture: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:  # fmt: skip
        """``[1 + S, n]`` scores as ``--matrix`` says (SPEC "Matrix modes"), and for ``screen``
        ``(estimated scores, confirmed cells [S, C])``; see :mod:`culture_neurons.pipeline.screen`."""
        mode = self.config.matrix
        if mode == "exact":
            return self._matrix_predictions(items, combined), None
        estimated = self._estimate_predictions(items, combined)
        if mode == "estimate":
            return estimated, None
        C = len(self.cultures)
        point = self.task.point(estimated[0], estimated[1:], items, culture, C, self.data)
        confirmed = screen.confirmed_cells(self.task.effect(point), C, self.config.screen_budget)
        exact = self._matrix_predictions(items, combined, confirmed=confirmed, culture=culture)
        estimated = self.task.onto(estimated, exact[0])
        return screen.combine(exact, estimated, confirmed, culture), (estimated, confirmed)

    def _add_screened(self, results: dict, screened: tuple, names: list[str], full, items,
                      culture) -> None:  # fmt: skip
        """``--matrix screen``: each method's JSON gains ``confirmed`` [S][C] (cells computed
        exactly; the others are estimated) and ``estimate`` (every matrix as the estimate alone
        gives it), so both stand side by side where a cell was confirmed."""
        estimated, confirmed = screened
        C = len(self.cultures)
        point = self.task.point(full, estimated[1:], items, culture, C, self.data)
        for name, res in results.items():
            first = names.index(name) * C  # its sets' rows (see _combine)
            rows = slice(first, first + C)
            res["screen_budget"] = self.config.screen_budget
            res["confirmed"] = confirmed[rows].tolist()
            res["estimate"] = {k: nan_to_none(point[k][rows].tolist())
                               for k in self.task.matrix_keys if point.get(k) is not None}  # fmt: skip

    def _matrix_predictions(self, items: list, combined: Masks, confirmed: torch.Tensor | None = None,
                            culture: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[1 + S, n] scores (the task's: MC letters int64, LM summed NLL float64): row 0 the
        full model, row 1 + s under set s. Groups of items are appended to
        ``progress/matrix.jsonl`` as they finish (the resume point).

        With ``confirmed`` [S, C] (``--matrix screen``), each group runs the full model and only
        the sets confirmed on its items' cultures (``culture`` [n], indices); the other scores
        stay the task's ``empty`` and the log is ``progress/screen.jsonl``."""
        S, n = len(combined), len(items)
        preds = self.task.empty((1 + S, n))
        group_size = max(1, self.config.batch_size // 4)
        per_forward = max(1, self.config.batch_size // group_size)
        name = "matrix" if confirmed is None else "screen"
        # Groups of similar prompt length (see batching); results go back to items' order.
        order = batching.by_length(items, self._lengths(items))
        self._log_padding(f"ablation {name}", [items[j] for j in order], group_size)
        log_path = self.out / "progress" / f"{name}{self.part.tag}.jsonl"
        # Everything that changes an exact prediction: the bootstrap's resamples and the matrix
        # mode do not.
        settings = {k: v for k, v in self.config.settings("evaluate").items()
                    if k not in ("resamples", "matrix", "screen_budget")}  # fmt: skip
        key = self._key("ablation matrix", combined.content_hash(), self.config.task,
                        self.config.scoring, self.config.reuse_vision, group_size, per_forward,
                        "by length", settings, self.config.intervention, self.config.alpha,
                        None if confirmed is None else confirmed.tolist())  # fmt: skip
        done = _read_groups(log_path, key) if self.resume else {}
        _rewrite_log(log_path, done)  # the log never mixes results of two keys

        def conditions_of(where: list[int]) -> list[int]:
            if confirmed is None:
                return [-1] + list(range(S))
            return screen.conditions(confirmed, culture[where].tolist())

        # (group, its items' positions in items) of this part
        groups = [(g, order[s : s + group_size]) for g, s in enumerate(range(0, n, group_size))
                  if self.part.owns(g)]  # fmt: skip
        total = sum(len(where) * len(conditions_of(where)) for _, where in groups)
        with Instrument(self.model, masks=combined, backend=self.config.backend,
                        alpha=self.config.alpha) as ablator, \
                self._bar(total, "ablation matrix") as bar, \
                open(log_path, "a", encoding="utf-8") as log_file:  # fmt: skip
            for g, where in groups:
                chunk = [items[j] for j in where]
                conditions = conditions_of(where)
                cells = (torch.tensor([c + 1 for c in conditions])[:, None],
                         torch.tensor(where)[None, :])  # fmt: skip  (preds cells [conditions, group])
                if g in done and done[g]["items"] == [it.id for it in chunk]:
                    preds[cells] = torch.tensor(done[g]["preds"], dtype=preds.dtype)
                    bar.update(len(chunk) * len(conditions))
                    continue
                group = self.task.group(chunk)
                out = []
                for c0 in range(0, len(conditions), per_forward):
                    part = conditions[c0 : c0 + per_forward]
                    out.append(group.predict(part, ablator))
                    bar.update(len(chunk) * len(part))
                block = torch.cat(out)  # [len(conditions), len(chunk)]
                preds[cells] = block
                _append(log_file, {"key": key, "group": g, "items": [it.id for it in chunk],
                                   "preds": block.tolist()})  # fmt: skip
        return self._gathered(preds)

    def _estimate_predictions(self, items: list, combined: Masks) -> torch.Tensor:
        """[1 + S, n] scores as :meth:`_matrix_predictions`, row 0 the full model (exact: the
        forward the gradients come from), every other row the first-order estimate
        (:mod:`culture_neurons.scoring.estimate`): one forward and backward per batch of
        ``batch_size`` items for every set at once, in batches of similar prompt length as
        the exact matrix. Resumable like the exact matrix (``progress/estimate.jsonl``)."""
        S, n = len(combined), len(items)
        preds = self.task.empty((1 + S, n))
        bs = self.config.batch_size
        order = batching.by_length(items, self._lengths(items))
        self._log_padding("estimated matrix", [items[j] for j in order], bs)
        log_path = self.out / "progress" / f"estimate{self.part.tag}.jsonl"
        key = self._key("estimated matrix", combined.content_hash(), self.config.task, bs,
                        "by length", self.config.intervention, self.config.alpha)  # fmt: skip
        done = _read_groups(log_path, key) if self.resume else {}
        _rewrite_log(log_path, done)
        # (batch, its items' positions in items) of this part
        batches = [(g, order[s : s + bs]) for g, s in enumerate(range(0, n, bs))
                   if self.part.owns(g)]  # fmt: skip
        total = sum(len(where) for _, where in batches)
        with self._bar(total, "estimated matrix (forward + backward)") as bar, \
                open(log_path, "a", encoding="utf-8") as log_file:  # fmt: skip
            for g, where in batches:
                chunk = [items[j] for j in where]
                if g in done and done[g]["items"] == [it.id for it in chunk]:
                    block = torch.tensor(done[g]["preds"], dtype=preds.dtype)
                else:
                    block = estimated_predictions(self.model, self.processor, chunk, combined,
                                                  alpha=self.config.alpha,
                                                  task=self.config.task).to(preds.dtype)  # fmt: skip
                    _append(log_file, {"key": key, "group": g, "items": [it.id for it in chunk],
                                       "preds": block.tolist()})  # fmt: skip
                preds[:, where] = block
                bar.update(len(chunk))
        return self._gathered(preds)

    def _gathered(self, preds: torch.Tensor) -> torch.Tensor:
        """Every rank's scores: each filled its own groups, ``task.missing`` marks the others."""
        if self.part.ranks:
            for other in self.part.gather(preds):
                preds = torch.where(self.task.missing(preds), other, preds)
        return preds

    # -- everything -------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        """Identification, selection, evaluation and report; resumable at every step."""
        stats = self._load_or(lambda: load_stats(self.out), self.identify, "stats.json")
        masks = self.select(stats)
        results = self.evaluate(masks)
        if self.part.main:
            from culture_neurons.report import write_report

            write_report(self.out, description=self.description)
        return results

    def _load_or(self, load, compute, marker: str):
        if self.resume and (self.out / marker).exists():
            log.info("resuming: %s already done", marker)
            return load()
        return compute()


def _nothing_correct() -> UsageError:
    return UsageError("no identification item is left: the full model answers none of them "
                      "correctly; start again with --identify-on all --overwrite")  # fmt: skip


def select_all(stats: Stats, config: RunConfig, out: Path | None = None) -> dict[str, Masks]:
    """Masks of every configured method, then each method's RND control: ``rnd_draws``
    uniform random sets of that method's own per-culture sizes (per layer with ``per_layer``),
    named as :func:`rnd_draws_of` says; saved to ``out/masks`` when ``out`` is given. Each
    carries the run's selection settings (``options["selection"]``).

    Methods whose sets have identical sizes share one series of draws: each method's p-value
    against it stays exact (its null is still uniform sets of its own sizes, independent of its
    selection); only their p-values are then correlated. The draws are seeded by the run's seed
    and the sizes, so the same sizes always get the same null.

    Raises:
        UsageError: a method selects no neuron at all (e.g. a ratio below one neuron); a
            culture left without neurons is one warning.
    """
    if stats.shard is not None:
        raise UsageError(f"these statistics are shard {stats.shard[0]}/{stats.shard[1]} only; "
                         "add all shards with `merge` first")  # fmt: skip
    masks = {m: select(stats, m, **config.selector_options(m)) for m in config.methods}
    _check_sizes(masks, config)
    if config.rnd_draws:
        for group, names in _size_groups(masks, config):
            like = masks[group[0]]
            draws = select(stats, "rnd", like=like, per_layer=config.per_layer,
                           seed=_rnd_seed(like, config), draws=config.rnd_draws)  # fmt: skip
            masks.update(zip(names, draws, strict=True))
    for m in masks.values():
        m.options["selection"] = config.settings("select")
    if out is not None:
        for name, m in masks.items():
            m.save(Path(out) / "masks" / f"{name}.safetensors")
    return masks


def rnd_draws_of(methods: dict[str, Masks], config: RunConfig) -> dict[str, list[str]]:
    """Method -> the names of its RND draws (``rnd-<methods of those sizes>-<i>``; none when
    ``rnd_draws`` is 0)."""
    return {m: names for group, names in _size_groups(methods, config) for m in group}


def _size_groups(methods: dict[str, Masks], config: RunConfig) -> list[tuple[list[str], list[str]]]:
    """(methods of identical set sizes, their draws' names), in the order of ``methods``."""
    groups: dict[tuple, list[str]] = {}
    for name, m in methods.items():
        groups.setdefault(_sizes_key(m, config.per_layer), []).append(name)
    return [(group, [f"rnd-{'+'.join(group)}-{i}" for i in range(config.rnd_draws)])
            for group in groups.values()]  # fmt: skip


def _sizes_key(masks: Masks, per_layer: bool) -> tuple[int, ...]:
    """What a size-matched RND draw matches: the sets' sizes, or their sizes per layer."""
    return tuple((masks.layer_counts() if per_layer else masks.sizes()).flatten().tolist())


def _rnd_seed(like: Masks, config: RunConfig) -> int:
    return stable_seed("rnd", config.seed, config.per_layer, *_sizes_key(like, config.per_layer))


def _check_sizes(masks: dict[str, Masks], config: RunConfig) -> None:
    """An empty selection is an error (it would measure nothing); an empty set, a warning."""
    for name, m in masks.items():
        sizes = m.sizes()
        if int(sizes.sum()) == 0:
            L, N = m.num_layers, m.num_neurons
            size = N if config.per_layer else L * N
            if name == "lape":
                raise UsageError(f"lape selected no neuron for any culture at --lape-top-rate "
                                 f"{config.lape_top_rate:g} (--lape-bar-ratio "
                                 f"{config.lape_bar_ratio:g}); raise --lape-top-rate, lower "
                                 "--lape-bar-ratio or drop lape from --methods")  # fmt: skip
            if round(size * config.ratio) == 0:
                where = " in each layer" if config.per_layer else ""
                raise UsageError(
                    f"--ratio {config.ratio:g} selects no neuron: round({size} x "
                    f"{config.ratio:g}) = 0 per culture{where} ({L} layers x {N} neurons); "
                    f"pass a --ratio above {0.5 / size:.2g}"
                )
            raise UsageError(f"{name} selected no neuron for any culture at --ratio "
                             f"{config.ratio:g}; raise --ratio or drop {name} from "
                             "--methods")  # fmt: skip
        empty = [m.names[s] for s in range(len(m)) if int(sizes[s]) == 0]
        if empty:
            log.warning("%s selected no neuron for %s: ablating their set changes nothing",
                        name, ", ".join(empty))  # fmt: skip


def _combine(masks: dict[str, Masks]) -> tuple[Masks, list[str]]:
    """One Masks holding every method's sets in order (set ids of a shared ablator)."""
    first = next(iter(masks.values()))
    names, sets = [], []
    for name, m in masks.items():
        for s in range(len(m)):
            names.append(f"{name}:{m.names[s]}")
            sets.append(m.flat_of(s))
    return Masks.from_sets(names, sets, first.fingerprint, method="combined"), list(masks)


def _read_groups(path: Path, key: str) -> dict[int, dict]:
    """Finished groups of the progress log computed under ``key``; a torn last line (kill -9)
    is ignored, groups of another key (model, masks, settings) are counted and dropped."""
    done, other = {}, 0
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("key") == key:
            done[rec["group"]] = rec
        else:
            other += 1
    if other:
        log.info("%s: %d group(s) were computed for another model, other masks or settings: "
                 "computing them again", path.name, other)  # fmt: skip
    return done


def _append(log_file, record: dict) -> None:
    """One finished group on the progress log, on disk before the next begins."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    os.fsync(log_file.fileno())


def _rewrite_log(path: Path, done: dict[int, dict]) -> None:
    """The progress log holding exactly ``done`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in done.values()), encoding="utf-8")
    os.replace(tmp, path)
