"""The language-modelling task (``lm``): plain sentences scored by their next-token NLL (nats;
see :mod:`culture_neurons.scoring.lm`); matrices of the per-culture NLL (nats/token) and its
change. A sentence has no right answer: identification records every item, and there is no
accuracy and no flip."""

from __future__ import annotations

import torch

from culture_neurons.errors import UsageError
from culture_neurons.eval_schema import NLL_DELTA
from culture_neurons.scoring import estimate, lm
from culture_neurons.scoring.metrics import per_culture_mean, per_culture_sum
from culture_neurons.scoring.uncertainty import Bootstrap
from culture_neurons.tasks.assemble import (
    add_tests,
    assemble,
    bootstrap,
    method_fields,
    oriented,
)

FAKER_DATA = "faker"  # --data value of the generated sentences
FAKER_SENTENCES = 16  # sentences per culture unless --max-items says otherwise


class LMTask:
    """Sentences: a score is an item's summed next-token NLL (float64, nats)."""

    name = "lm"
    description = (f"sentences, scored by next-token NLL (a text-only --model and --data "
                   f"{FAKER_DATA})")  # fmt: skip
    matrix_keys = ("nll", "delta")
    fixed_identify_on = "all"  # no right answer: every identification sentence is recorded
    hidden_labels_note = None
    has_toy = False
    estimate_all_logits = True  # the NLL of every next token

    def __init__(self, model, processor, config):
        lm.check_model(model)
        self.model, self.processor, self.config = model, processor, config

    # -- what the task is --------------------------------------------------------------------
    @classmethod
    def measures(cls, labels_available: bool) -> tuple:
        return (NLL_DELTA,)

    @classmethod
    def identify_on(cls, given: str | None, labels_available: bool) -> str:
        """Always ``all``.

        Raises:
            UsageError: ``correct`` given (a sentence has no right answer).
        """
        if given == "correct":
            raise UsageError(f"--identify-on correct does not apply to --task {cls.name}: a "
                             "sentence has no right answer, so every identification sentence "
                             "is recorded; drop --identify-on")  # fmt: skip
        return cls.fixed_identify_on if given is None else given

    @classmethod
    def load_data(cls, o, path=None):
        """Faker's sentences (``--data faker``; ``--max-items`` sentences per culture)."""
        if o["model"] is None:
            raise UsageError(f"--task {cls.name} needs --model (a text-only causal LM folder "
                             "or hub id, e.g. Gemma 3 270M; see bench/real_lm.py)")  # fmt: skip
        if o["data"] not in (None, FAKER_DATA):
            raise UsageError(f"--task {cls.name} reads --data {FAKER_DATA} (generated "
                             f"sentences), got {o['data']!r}")  # fmt: skip
        from culture_neurons.data.faker_text import make_faker_data

        per_culture = o["max_items"] if o["max_items"] is not None else FAKER_SENTENCES
        return make_faker_data(list(o["cultures"]) if o["cultures"] else None,
                               per_culture=per_culture, seed=o["seed"])  # fmt: skip

    @classmethod
    def write_report(cls, out_dir, description: str = ""):
        from culture_neurons.report import lm as report

        return report.write_report(out_dir, description=description)

    @staticmethod
    def estimated(model, processor, items: list, masks, alpha: float,
                  scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
        """float64 summed NLL [1 + K * S, B]: the full model's, then each set's estimate per
        scale of the estimated change."""
        return estimate.estimated_lm(model, processor, items, masks, alpha, scales)

    # -- scoring ------------------------------------------------------------------------------
    def encode(self, items: list, device) -> dict:
        return lm.encode_text(self.model, self.processor, items, device=device)

    def lengths(self, items: list) -> list[int]:
        return lm.text_lengths(self.model, self.processor, items)

    def group(self, items: list) -> lm.LMGroup:
        return lm.LMGroup(self.model, self.processor, items)

    def predict(self, items: list, batch_size: int, progress=None) -> torch.Tensor:
        """The full model's summed NLL [n]."""
        out = []
        for start in range(0, len(items), batch_size):
            group = self.group(items[start : start + batch_size])
            out.append(group.predict([-1])[0])
            if progress is not None:
                progress(group.size)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    @staticmethod
    def empty(shape: tuple[int, int]) -> torch.Tensor:
        """Scores not computed yet: NaN (a real NLL is finite)."""
        return torch.full(shape, float("nan"), dtype=torch.float64)

    @staticmethod
    def missing(preds: torch.Tensor) -> torch.Tensor:
        return torch.isnan(preds)

    def tokens(self, items: list) -> torch.Tensor:
        """int64 [n]: each sentence's predicted tokens (from one tokenizer call, no encoding)."""
        return lm.predicted_tokens(torch.tensor(self.lengths(items)))

    # -- scores to numbers ----------------------------------------------------------------
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
        boot = bootstrap(culture, C, self.config, per_set, self.missing)

        def mats(sums, resampled: Bootstrap | None = None) -> dict:
            return lm.nll_matrices(full, sums, tokens, culture, C, boot=resampled)

        # NLL grows (higher = more selective) when neurons are damped or ablated.
        measured = self.measures(False)
        results = {}
        for name in nulls:
            res = method_fields(name, masks, culture, cultures, nulls, self.config, measured)
            res.update(task=self.name, labels_available=False,  # no answer key: no accuracy
                       units=lm.UNITS, tokens_per_culture=per_culture_sum(tokens, culture, C),
                       accuracy_full=None, accuracy=None, flip=None)  # fmt: skip
            res.update(assemble(mats, per_set, masks, name, nulls[name], boot,
                                ("nll_full", "nll", "delta"),
                                oriented(measured, self.config.alpha)))  # fmt: skip
            results[name] = res
        add_tests(results, per_set, full, culture, self.changes, {"tokens": tokens}, boot)
        return full_record, results

    # -- per-item changes (what the tests against RND recompute from) --------------------------
    def item_data(self, items: list, data) -> dict:
        """What :meth:`changes` needs of the items besides their scores: their tokens."""
        return {"tokens": self.tokens(items)}

    @staticmethod
    def changes(full: torch.Tensor, scores: torch.Tensor, culture: torch.Tensor, C: int,
                item_data: dict) -> dict:  # fmt: skip
        """Per-item changes ``{"delta": [S, n]}``: an item's summed NLL change x n_c / T_c
        (items and tokens of its culture computed under the set: NaN where the item was not,
        ``--matrix sample``), so that a culture's plain mean over the computed items is its
        token-weighted NLL change (nats/token)."""
        tokens = item_data["tokens"]
        change = scores.double() - full.double()  # [S, n]
        counted = torch.where(torch.isnan(change), torch.nan, tokens.double())
        per_item = per_culture_mean(counted, culture, C)  # [S, C] tokens per computed item
        return {NLL_DELTA.key: change / per_item[:, culture]}
