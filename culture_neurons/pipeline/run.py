"""The whole experiment (SPEC "The science"), as resumable steps writing SPEC's output layout.

    full model on the identification half  ->  statistics of its (correct) items  ->  every
    selector  ->  every culture's evaluation half under every method's every culture set
    (+ each method's size-matched RND draws), rows of many sets sharing batches, ablated or
    steered  ->  matrices, summaries, bootstrap intervals, p-values against RND  ->  report.

:class:`Run` orchestrates the steps; each lives in its own module: identification
(:mod:`.identify`), selection and its RND controls (:mod:`culture_neurons.selection.controls`),
the ablation matrix in every ``--matrix`` mode (:mod:`.matrix`, resumable through
:mod:`.group_log`), the eval JSON (the run's task, :mod:`culture_neurons.tasks`), the report.

Cost: the matrix runs ``1 + C * (methods + groups * rnd_draws)`` conditions over the
evaluation items, where ``groups`` is the number of distinct set-size vectors among the
methods (methods of identical sizes share their RND draws). ``matrix="estimate"`` replaces
them by one forward and backward per batch of items (:mod:`culture_neurons.scoring.estimate`);
``matrix="screen"`` adds exact conditions for the cells :mod:`culture_neurons.pipeline.screen`
confirms; ``matrix="sample"`` runs each set on its own culture's items and a share of the
others' (:mod:`culture_neurons.scoring.sampled`).

Every step leaves its result in ``OUT`` (``stats.*``, ``masks/``, ``eval/``) and its progress
in ``OUT/progress``, so a run stopped anywhere (Ctrl-C, kill -9) continues with ``resume=True``
and ends with the same numbers as an uninterrupted one. Progress is keyed on the model
(fingerprint and dtype), the items, the masks' content and the settings each cached result
depends on (``RunConfig.cache_settings``; :func:`culture_neurons.pipeline.rundir.digest`):
what was computed under another key is computed again, never mixed in. ``OUT/run.json`` holds
the run's settings; see :mod:`culture_neurons.pipeline.rundir` for how later steps agree with it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from culture_neurons.errors import DataError, StatsMismatchError, UsageError
from culture_neurons.masks import Masks, load_masks
from culture_neurons.models import adapters, image_budget
from culture_neurons.pipeline import batching, halves, identify, matrix, progress, retest, rundir
from culture_neurons.pipeline.config import RunConfig, identify_on_for
from culture_neurons.pipeline.distributed import Partition
from culture_neurons.pipeline.identify import Checkpoints
from culture_neurons.pipeline.rundir import write_json
from culture_neurons.selection.controls import rnd_draws_of, select_all
from culture_neurons.stats import Stats, load_stats
from culture_neurons.tasks import task_class

log = logging.getLogger(__name__)

__all__ = ["Checkpoints", "Run", "RunConfig", "rnd_draws_of", "select_all"]


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
        self.task = task_class(self.config.task)(self.model, self.processor, self.config)
        self._length_of: dict[str, int] = {}  # item id -> prompt tokens (see _lengths)
        if self.part.main:
            self._prepare_dir()
        self.part.barrier()

    # -- output dir ----------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        """Check ``OUT`` against this run, then write run.json (:func:`rundir.begin`)."""
        meta = {"config": self.config.settings(), "inputs": dict(self.inputs),
                "cultures": self.cultures, "fingerprint": asdict(self.fingerprint),
                "data": getattr(self.data, "source", ""), "data_hash": self.data_hash,
                "changes": []}  # fmt: skip
        rundir.begin(self.out, meta, resume=self.resume, overwrite=self.overwrite,
                     command=self.command, fingerprint=self.fingerprint)  # fmt: skip

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

    # -- steps 1 and 2: identification (culture_neurons.pipeline.identify) ---------------------
    @property
    def one_pass(self) -> bool:
        """Whether identification scores and records each item in one prefill
        (:func:`~culture_neurons.pipeline.identify.one_pass`)."""
        return identify.one_pass(self.config)

    def identification_items(self) -> list:
        """This part's identification items in recording order
        (:func:`~culture_neurons.pipeline.identify.identification_items`)."""
        return identify.identification_items(self)

    def identify(self) -> Stats:
        """Record statistics on the identification items; checkpointed, resumable
        (:func:`~culture_neurons.pipeline.identify.record`)."""
        return identify.record(self)

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
        """Prompt and image tokens of ``items`` (:func:`image_budget.token_summary`)."""
        return image_budget.token_summary(self.model, self.processor, items, self._lengths(items))

    def _log_padding(self, what: str, batches: list[list]) -> None:
        """Log the padded share of ``batches`` (lists of items, each padded to its longest)."""
        share = batching.padding_of([self._lengths(b) for b in batches])
        # A group of prompts is one forward in identification; the exact matrix runs each
        # group under several conditions, so its forwards hold more rows than prompts.
        log.info("%s: %d prompts in %d groups of up to %d, %.1f %% of the prefilled rows are "
                 "padding", what, sum(map(len, batches)), len(batches),
                 max(map(len, batches), default=0), 100 * share)  # fmt: skip

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
        combined, names = matrix.combine(masks)
        items = [it for c in self.cultures for it in self.evaluation.items_by_culture[c]]
        C = len(self.cultures)
        culture = torch.tensor([self.cultures.index(it.culture) for it in items])
        preds, record = matrix.scores(self, items, combined, culture, masks)  # [1 + S, n]
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
        if self.config.matrix == "screen":
            matrix.add_screened(self, results, record, names, preds[0], items, culture)
        elif self.config.matrix == "sample":
            for res in results.values():
                res["sample"] = record
        write_json(self.out / "eval" / "full.json", full_record)
        # per-item scores, so that report recomputes the tests without the model
        retest.save_items(self.out, per_set, preds[0], culture, self.task.item_data(items, self.data))
        hashes = {n: m.content_hash() for n, m in masks.items()}
        stability = self._stability()
        for name, res in results.items():
            if name in stability:
                res["stability"] = stability[name]
            # Which masks these numbers belong to (``report`` refuses them under others).
            res["masks_hash"] = {n: hashes[n] for n in [name, *nulls[name]]}
            write_json(self.out / "eval" / f"{name}.json", res)
        return results

    def _stability(self) -> dict[str, dict]:
        """Each method's split-half stability (:mod:`culture_neurons.pipeline.halves`; {}
        when the statistics were recorded without halves)."""
        if not (self.out / "stats.json").is_file():
            return {}
        return halves.of_run(self.out, load_stats(self.out), self.config) or {}

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
