"""The language-modelling task: next-token negative log-likelihood (NLL) of plain sentences.

An item is a sentence (``culture_neurons.data.faker_text.TextItem``: ``id, culture, text``),
tokenized as the model's tokenizer does by default (a BOS token where the model uses one), with
no chat template. Its score under a condition (the full model, or one ablation set) is

    nll_sum[i] = - sum_{t=1}^{T_i - 1} log p(x_t | x_<t)      (nats; T_i = item i's tokens)

and a culture's metric is the token-weighted mean ``sum_i nll_sum[i] / sum_i (T_i - 1)`` in
nats/token, i.e. ``log`` of its perplexity, as LAPE (Tang et al. 2024) measured languages.
The ablation matrices hold ``delta[s][c'] = NLL_ablated - NLL_full``: positive = the ablation
hurt culture c'. So here, unlike multiple-choice accuracy, a *more positive* self and gap mean a
more selective method.

There is no right answer to a sentence, so identification records every identification item
(``identify_on`` does not apply). Batches are right-padded: real tokens keep positions 0..T_i-1,
exactly as in an unpadded forward (models take positions from the cache, not the mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from culture_neurons.errors import UsageError
from culture_neurons.eval_schema import MATRICES, NLL_DELTA
from culture_neurons.models import adapters
from culture_neurons.scoring.metrics import per_culture_mean
from culture_neurons.scoring.prompting import tokenizer_of
from culture_neurons.scoring.uncertainty import Bootstrap

# Token rows per head chunk: the Gemma 3 vocabulary (262144) makes a logit row 1 MiB in fp32,
# so 256 rows keep the transient logits at 256 MiB whatever the batch.
HEAD_CHUNK_ROWS = 256
UNITS = {"nll": MATRICES["nll"], NLL_DELTA.key: NLL_DELTA.unit}  # eval JSON ``units``


def check_model(model) -> None:
    """The LM task scores text with a causal LM head; VLM families are not wired for it."""
    adapter = adapters.get_adapter(model)
    if adapter.vlm:
        raise UsageError(
            f"the lm task runs on text-only causal LMs; {adapter.family} is a vision-language "
            "family (use --task mc, or load its text-only checkpoint)"
        )


def encode_text(model, processor, items, device=None) -> dict:
    """A right-padded batch ``{input_ids, attention_mask}`` ``[B, T]`` of the items' texts."""
    tok = tokenizer_of(processor)
    side, tok.padding_side = tok.padding_side, "right"
    restore_pad = tok.pad_token is None
    if restore_pad:  # padding is masked out; any id does
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    try:
        batch = tok([it.text for it in items], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
        if restore_pad:
            tok.pad_token = None
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def text_lengths(model, processor, items) -> list[int]:
    """Tokens of each item's text as :func:`encode_text` gives them, padding aside."""
    return [len(ids) for ids in tokenizer_of(processor)([it.text for it in items])["input_ids"]]


def target_counts(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: predicted tokens per row (every real token but the first)."""
    return predicted_tokens(attention_mask.long().sum(dim=1).cpu())


def predicted_tokens(lengths: torch.Tensor) -> torch.Tensor:
    """int64: the predicted tokens of texts of ``lengths`` tokens (all but the first)."""
    return (lengths.long() - 1).clamp(min=0)


@torch.no_grad()
def nll_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: each right-padded row's summed next-token NLL (nats).

    The decoder runs once; the LM head (and Gemma's final soft-capping, where configured) runs
    on the real positions only, ``HEAD_CHUNK_ROWS`` at a time, so full ``[B, T, V]`` logits are
    never held.
    """
    decoder = adapters.get_adapter(model).language_model(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state[:, :-1]  # [B, T-1, H] position t predicts token t+1
    valid = attention_mask[:, 1:].bool()  # [B, T-1] right padding: a real target
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    rows = rows[:, None].expand_as(valid)[valid]  # [R] which row each target belongs to
    h, targets = hidden[valid], input_ids[:, 1:][valid]  # [R, H], [R]
    head = model.get_output_embeddings()
    cap = adapters.logit_softcap(model)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for start in range(0, targets.numel(), HEAD_CHUNK_ROWS):
        part = slice(start, start + HEAD_CHUNK_ROWS)
        logits = head(h[part]).float()  # [r, V]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        nll = F.cross_entropy(logits, targets[part], reduction="none")  # [r]
        out.index_add_(0, rows[part], nll.double())
    return out.cpu()


class LMGroup:
    """B sentences scored under many conditions (an ablation set id, -1 = the full model):
    ``predict(conditions) -> float64 [len(conditions), B]`` summed NLL (nats)."""

    def __init__(self, model, processor, items, *, device=None):
        self.model, self.items = model, list(items)
        device = device if device is not None else next(model.parameters()).device
        self.inputs = encode_text(model, processor, self.items, device=device)

    @property
    def size(self) -> int:
        return len(self.items)

    def predict(self, conditions: list[int], ablator=None) -> torch.Tensor:
        if ablator is None and any(c >= 0 for c in conditions):
            raise UsageError("ablation conditions need an ablator (culture_neurons.ablate)")
        k = len(conditions)
        inputs = {key: v.repeat(k, 1) for key, v in self.inputs.items()}  # [k*B, T]
        set_ids = torch.tensor(conditions, dtype=torch.int32).repeat_interleave(self.size)
        if ablator is not None:
            ablator.set_batch(None, set_ids=set_ids, **inputs)
        try:
            sums = nll_sums(self.model, inputs["input_ids"], inputs["attention_mask"])
        finally:
            if ablator is not None:
                ablator.clear_batch()
        return sums.view(k, self.size)


def culture_nll(sums: torch.Tensor, tokens: torch.Tensor, culture: torch.Tensor,
                C: int) -> torch.Tensor:  # fmt: skip
    """Token-weighted mean NLL per culture, nats/token: ``sums`` ``[..., n]`` summed NLL of
    each item, ``tokens`` int64 ``[n]`` its predicted tokens, ``culture`` ``[n]`` -> ``[..., C]``
    (NaN for a culture without items); a NaN sum (not computed) leaves its item out of both."""
    # ratio of per-culture means = ratio of per-culture sums (the item counts cancel)
    tokens = torch.where(torch.isnan(sums), torch.nan, tokens.double())
    return per_culture_mean(sums, culture, C) / per_culture_mean(tokens, culture, C)


def nll_matrices(full: torch.Tensor, sums: torch.Tensor, tokens: torch.Tensor,
                 culture: torch.Tensor, C: int, boot: Bootstrap | None = None) -> dict:  # fmt: skip
    """``nll_full`` [C] and ``nll`` / ``delta`` [S, C] in nats/token from summed NLL ``full``
    [n] (the full model) and ``sums`` [S, n] (row s under ablation set s; NaN where not
    computed, ``--matrix sample``); with ``boot``, the same on each of its B resamples ([B, C],
    [B, S, C]; paired: the same resampled sentences for every condition, each culture's NLL
    their summed NLL over their summed tokens). ``delta`` is paired (the summed change over
    the summed tokens of the items computed under the set), ``nll`` the full model's plus it."""
    change = sums.double() - full.double()
    if boot is None:
        nll_full = culture_nll(full, tokens, culture, C)
        delta = culture_nll(change, tokens, culture, C)
    else:
        nll_full = boot.culture_sums(full) / boot.culture_sums(tokens.double())  # [B, C]
        counted = torch.where(torch.isnan(change), 0.0, tokens.double())  # [S, n]
        delta = (boot.culture_sums(change.nan_to_num(0.0))
                 / boot.culture_sums(counted)).movedim(-2, 0)  # [B, S, C]  # fmt: skip
    return {"nll_full": nll_full, "nll": nll_full.unsqueeze(-2) + delta, "delta": delta}
