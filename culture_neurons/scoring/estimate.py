"""The ablation matrix from gradients: a first-order estimate (SPEC "Matrix modes": ``estimate``).

Symbols: n items, B items per batch, S mask sets (every set of every method and RND draw),
L x N neurons. One forward and a few backward passes per batch give, per item, the attribution
``A[k, b, l, n] = sum_t a * d q_k / d a`` of every neuron (:mod:`culture_neurons.instrument.attribution`);
intervening on set s (``a := (1 + alpha) a``; ablation alpha = -1) then moves ``q_k`` by

    dq_k[b, s] ~ alpha * sum_{(l, n) in s} A[k, b, l, n]

for every set at once (a gather and a segment sum over the sets' CSR entries).

Scores, as the exact matrix computes them:
- multiple choice: the letter-logit margins ``q_k = score(letter k) - score(letter A)``
  (k = B, C, D; three backwards: only differences decide the argmax), estimated prediction =
  argmax over ``[0, q_B + dq_B, q_C + dq_C, q_D + dq_D]``;
- language modelling: ``q`` = the item's summed next-token NLL (one backward).

Row 0 of every result is the full model, exact (it is the forward the gradients come from).
Where the first order fails (saturating neurons, large sets) the estimate is off in magnitude;
bench/bench_estimate.py measures by how much against exact matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from culture_neurons.instrument.attribution import attribute
from culture_neurons.masks import Masks
from culture_neurons.scoring import lm
from culture_neurons.scoring.multiple_choice import letter_scores
from culture_neurons.scoring.prompting import encode, letter_token_ids


def set_sums(A: torch.Tensor, masks: Masks) -> torch.Tensor:
    """``[Q, B, S]``: for every set s, ``sum_{(l, n) in s} A[q, b, l, n]`` (A ``[Q, B, L, N]``).
    An empty set sums to exactly 0."""
    Q, B = A.shape[:2]
    flat = A.reshape(Q, B, -1)
    entries = masks.flat.to(A.device)
    set_of = torch.repeat_interleave(torch.arange(len(masks)), masks.sizes()).to(A.device)
    out = torch.zeros(Q, B, len(masks), dtype=A.dtype, device=A.device)
    return out.index_add_(2, set_of, flat.index_select(2, entries))


def mc_margins(letters: list[list[int]]):
    """``outputs -> [B, 3]``: letter-score margins B-A, C-A, D-A at the answer position."""

    def quantities(outputs) -> torch.Tensor:
        scores = letter_scores(outputs.logits[:, -1, :].float(), letters)  # [B, 4]
        return scores[:, 1:] - scores[:, :1]

    return quantities


def lm_nll(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``outputs -> [B, 1]``: each right-padded row's summed next-token NLL (nats), as
    :func:`culture_neurons.scoring.lm.nll_sums` computes it (from the model's own logits,
    soft-capping included)."""
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()

    def quantities(outputs) -> torch.Tensor:
        logits = outputs.logits[:, :-1].float()  # position t predicts token t + 1
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
        return torch.where(valid, nll, 0.0).sum(dim=1, keepdim=True)

    return quantities


def attribute_mc(model, processor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margins [B, 3], A [3, B, L, N])`` of one encoded batch of multiple-choice prompts."""
    # The margins read the last position only: logits of every position ([B, T, vocab], 2.4 GB
    # per 4,000-token item at Qwen's 152k vocabulary in fp32) are never made.
    return attribute(model, {**inputs, "logits_to_keep": 1},
                     mc_margins(letter_token_ids(processor)))  # fmt: skip


def predictions_from_margins(margins: torch.Tensor) -> torch.Tensor:
    """int64 letter index from margins ``[..., 3]`` (letter A's margin is 0)."""
    zero = torch.zeros_like(margins[..., :1])
    return torch.cat([zero, margins], dim=-1).argmax(dim=-1)


def estimate_mc(model, processor, items, masks: Masks, alpha: float = -1.0) -> tuple:
    """``(margins [B, 3], shifts [3, B, S])`` of one batch of multiple-choice items: the full
    model's margins and their estimated change under each set (see the module docstring)."""
    inputs = encode(model, processor, items, device=next(model.parameters()).device)
    margins, A = attribute_mc(model, processor, inputs)
    return margins, alpha * set_sums(A, masks)


def estimate_lm(model, processor, items, masks: Masks, alpha: float = -1.0) -> tuple:
    """``(nll [B, 1], shifts [1, B, S])`` of one batch of sentences (nats)."""
    inputs = lm.encode_text(model, processor, items, device=next(model.parameters()).device)
    quantities = lm_nll(inputs["input_ids"], inputs["attention_mask"])
    nll, A = attribute(model, inputs, quantities)
    return nll, alpha * set_sums(A, masks)


def estimated_mc(model, processor, items, masks: Masks, alpha: float = -1.0,
                 scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
    """int64 ``[1 + K * S, B]`` letter indices: row 0 the full model's (exact), row
    1 + k * S + s the estimated answer under set s with the estimated shift x ``scales[k]``
    (K scales; the first order is linear in the shift, so one backward serves them all)."""
    margins, shifts = estimate_mc(model, processor, items, masks, alpha)
    full = predictions_from_margins(margins)  # [B]
    est = [predictions_from_margins(margins.T[:, :, None].add(k * shifts).permute(2, 1, 0))
           for k in scales]  # each [S, B]  # fmt: skip
    return torch.cat([full[None], *est]).cpu()


def estimated_lm(model, processor, items, masks: Masks, alpha: float = -1.0,
                 scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
    """float64 ``[1 + K * S, B]`` summed NLL: row 0 the full model's (exact), row 1 + k * S + s
    the estimate under set s with the change x ``scales[k]``."""
    nll, shifts = estimate_lm(model, processor, items, masks, alpha)
    full = nll[:, 0].double()
    change = shifts[0].T.double()  # [S, B]
    return torch.cat([full[None], *(full[None] + k * change for k in scales)]).cpu()


def estimated_predictions(model, processor, items, masks: Masks, alpha: float = -1.0,
                          task: str | None = None) -> torch.Tensor:  # fmt: skip
    """``[1 + S, B]``: row 0 the full model's score (exact), row 1 + s the estimate under set s,
    as task ``task`` (default: multiple choice) scores (:mod:`culture_neurons.tasks`)."""
    from culture_neurons.tasks import task_class

    return task_class(task).estimated(model, processor, items, masks, alpha)
