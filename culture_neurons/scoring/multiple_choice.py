"""Multiple-choice scoring under ablation, with each item's vision work done once.

Scoring (SPEC "Evaluation"): ``logits`` (default) takes the argmax, over the option letters,
of the next-token logits after the prompt (one prefill, deterministic); ``generate`` decodes
greedily and parses the first standalone letter (-1 = unparseable, counted as wrong).

Decoder ablations never touch the vision tower, so a :class:`Group` of items is encoded once
and its first forward (the full model) keeps the language model's input embeddings (image
features already merged) and position ids. Every ablation condition after that repeats the
group's inputs, one copy per condition in the same batch (rows carry their set id), drops the
pixels, and injects the kept embeddings and positions: no processor, no vision tower and no
position computation run again.
"""

from __future__ import annotations

import logging

import torch

from culture_neurons.errors import UsageError
from culture_neurons.models import adapters
from culture_neurons.scoring.prompting import encode, letter_token_ids, parse_letter, tokenizer_of

log = logging.getLogger(__name__)
SCORINGS = ("logits", "generate")


class Group:
    """A group of B items evaluated under many conditions (a condition = an ablation set id,
    -1 = the full model). ``predict(conditions) -> int64 [len(conditions), B]`` letter indices.
    """

    def __init__(self, model, processor, items, *, device=None, scoring: str = "logits",
                 reuse_vision: bool = True, max_new_tokens: int = 8):  # fmt: skip
        if scoring not in SCORINGS:
            raise UsageError(f"scoring={scoring!r} is not one of {', '.join(SCORINGS)}")
        self.model, self.processor, self.items = model, processor, list(items)
        self.device = device if device is not None else next(model.parameters()).device
        self.scoring, self.max_new_tokens = scoring, max_new_tokens
        self.adapter = adapters.get_adapter(model)
        # Generation runs the prompt then one token at a time: nothing to reuse.
        self.reuse = reuse_vision and self.adapter.vlm and scoring == "logits"
        self.inputs = encode(model, processor, self.items, device=self.device)
        self.embeds: torch.Tensor | None = None  # [B, T, H] language-model input, once known
        # [..., B, T] the positions the model computed for the group (Qwen-VL's 3D rope
        # index is a Python loop per row, ~25 % of a toy forward): reused like the embeddings.
        self.positions: torch.Tensor | None = None
        self._letters = None

    @property
    def size(self) -> int:
        return len(self.items)

    def predict(self, conditions: list[int], ablator=None) -> torch.Tensor:
        """Predictions of every item under every condition; ``ablator`` (an Instrument with
        masks) is needed as soon as a condition is not -1."""
        k = len(conditions)
        if ablator is None and any(c >= 0 for c in conditions):
            raise UsageError("ablation conditions need an ablator (culture_neurons.ablate)")
        set_ids = torch.tensor(conditions, dtype=torch.int32).repeat_interleave(self.size)
        first = self.reuse and self.embeds is None
        if first and k > 1:  # keep the group's own embeddings from a plain-sized pass first
            head = self.predict(conditions[:1], ablator)
            return torch.cat([head, self.predict(conditions[1:], ablator)])
        inputs = self._repeat(k)
        with self._embeddings(k, capture=first):
            if ablator is not None:
                ablator.set_batch(None, set_ids=set_ids, **inputs)
            try:
                preds = self._score(inputs)
            finally:
                if ablator is not None:
                    ablator.clear_batch()
        return preds.view(k, self.size)

    def predict_staged(self, recorder, culture) -> torch.Tensor:
        """The full model's predictions ``int64 [B]``, the forward that scores them also
        staging each item's statistics in ``recorder`` (an Instrument that records; see
        ``set_batch(stage=True)``) for the caller to ``recorder.commit(keep)`` once it knows
        which items count. ``culture``: one culture id (or name) per item.

        Raises:
            UsageError: generation scoring (it runs one forward per new token besides the
                prompt's, which is recorded apart: see ``Run.identify``).
        """
        if self.scoring != "logits":
            raise UsageError(f"predict_staged scores from the prompt's logits; scoring="
                             f"{self.scoring!r} generates tokens after it")  # fmt: skip
        recorder.set_batch(culture, stage=True, **self.inputs)
        try:
            return self._score(self.inputs)
        finally:
            recorder.clear_batch()

    # -- inputs ------------------------------------------------------------------------------
    def _repeat(self, k: int) -> dict:
        """The group's inputs, k copies stacked on the batch dim; pixels dropped once the
        embeddings are kept."""
        injected = self.reuse and self.embeds is not None
        has_pixels = any(key.startswith("pixel_values") for key in self.inputs)
        if k > 1 and has_pixels and not injected:
            # Pixel layouts differ by family (Qwen concatenates patches): let the processor
            # build the repeated batch.
            return encode(self.model, self.processor, self.items * k, device=self.device)
        out = {}
        for key, v in self.inputs.items():
            if injected and key.startswith("pixel_values"):
                continue
            if k > 1 and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == self.size:
                v = v.repeat(k, *([1] * (v.dim() - 1)))
            out[key] = v
        if injected and self.positions is not None:  # rows are the batch dim, -2
            out["position_ids"] = self.positions.repeat(*[1] * (self.positions.dim() - 2), k, 1)
        return out

    def _embeddings(self, k: int, capture: bool):
        """Context: keep (capture) or inject the language model's ``inputs_embeds``."""
        group = self

        class _Ctx:
            def __enter__(self_):
                self_.handle = None
                if not group.reuse:
                    return self_
                lm = group.adapter.language_model(group.model)

                def hook(module, args, kwargs):
                    if capture:
                        group.embeds = kwargs["inputs_embeds"].detach()
                        positions = kwargs.get("position_ids")
                        if isinstance(positions, torch.Tensor) and positions.dim() >= 2 and (
                                positions.shape[-2] == group.size):  # fmt: skip
                            group.positions = positions.detach()
                        return None
                    kwargs["inputs_embeds"] = group.embeds.repeat(k, 1, 1)
                    return args, kwargs

                self_.handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
                return self_

            def __exit__(self_, *exc):
                if self_.handle is not None:
                    self_.handle.remove()

        return _Ctx()

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, inputs: dict) -> torch.Tensor:
        if self.scoring == "generate":
            return self._generate(inputs)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        return letter_scores(logits, self.letters).argmax(dim=1).cpu()

    @property
    def letters(self) -> list[list[int]]:
        if self._letters is None:
            self._letters = letter_token_ids(self.processor)
        return self._letters

    def _generate(self, inputs: dict) -> torch.Tensor:
        tok = tokenizer_of(self.processor)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([parse_letter(t) for t in texts], dtype=torch.int64)


def letter_scores(logits: torch.Tensor, letters: list[list[int]]) -> torch.Tensor:
    """``[rows, 4]``: per option letter, its best token logit (see letter_token_ids)."""
    return torch.stack([logits[:, ids].amax(dim=1) for ids in letters], dim=1)


def predict(model, processor, items, *, batch_size: int = 8, ablator=None, condition: int = -1,
            scoring: str = "logits", progress=None) -> torch.Tensor:  # fmt: skip
    """Predicted letter index (0-3, -1 unparseable) of every item under one condition."""
    preds = []
    for start in range(0, len(items), batch_size):
        group = Group(model, processor, items[start : start + batch_size], scoring=scoring,
                      reuse_vision=False)  # fmt: skip
        preds.append(group.predict([condition], ablator)[0])
        if progress is not None:
            progress(group.size)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
