"""The estimate's backward stays within its stated memory bound (docs/scale.md): each
decoder layer is recomputed in its own backward, so a layer adds only its input ``[B, T, H]`` to
the peak, never its ``[B, T, N]`` internals; and the multiple-choice margins never make the
logits of every position.

Peak = live tensor bytes above the call's start (:func:`culture_neurons.testing.memory.peak_bytes`,
what bench/bench_width.py reports). Keeping every layer's graph (``checkpoint=False``) is the
control: it grows by several ``[B, T, N]`` per layer, which the bound must catch.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from culture_neurons.instrument.attribution import attribute
from culture_neurons.scoring.estimate import attribute_mc
from culture_neurons.testing.memory import peak_bytes
from culture_neurons.testing.tiny import tiny_processor

B, T, H, N = 2, 64, 64, 512


def llama(layers: int, vocab: int = 128):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=H, intermediate_size=N, num_hidden_layers=layers,
                                      num_attention_heads=4, vocab_size=vocab)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def inputs(vocab: int = 128) -> dict:
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -5:] = 0  # right padding: not counted
    return {"input_ids": ids, "attention_mask": mask}


def estimate_peak(layers: int, checkpoint: bool) -> int:
    model, batch = llama(layers), {**inputs(), "logits_to_keep": 1}
    quantities = lambda out: out.logits[:, -1, :3]  # noqa: E731
    attribute(model, batch, quantities, checkpoint=checkpoint)  # warm-up: lazy buffers
    return peak_bytes(lambda: attribute(model, batch, quantities, checkpoint=checkpoint))


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_layer_adds_its_input_to_the_peak_not_its_internals(checkpoint):
    per_layer = (estimate_peak(8, checkpoint) - estimate_peak(2, checkpoint)) / 6
    layer_input = B * T * H * 4  # fp32 [B, T, H]
    if checkpoint:
        assert per_layer <= 2 * layer_input, per_layer / layer_input
    else:  # the control: autograd keeps gate, up, act and product, each [B, T, N]
        assert per_layer > 2 * B * T * N * 4, per_layer / (B * T * N * 4)


def test_the_margins_never_make_every_position_s_logits():
    vocab = 16384  # every position's fp32 logits: B * T * vocab * 4 = 8 MiB, above the rest
    model, batch = llama(2, vocab), inputs(vocab)
    processor = tiny_processor("llama")
    attribute_mc(model, processor, batch)
    peak = peak_bytes(lambda: attribute_mc(model, processor, batch))
    assert peak < B * T * vocab * 4, peak / 2**20
    # The control: the same margins read from every position's logits.
    from culture_neurons.scoring.estimate import mc_margins
    from culture_neurons.scoring.prompting import letter_token_ids

    full = peak_bytes(lambda: attribute(model, batch, mc_margins(letter_token_ids(processor))))
    assert full > B * T * vocab * 4, full / 2**20


@pytest.mark.parametrize("layers,tokens,all_logits", [(2, 64, False), (6, 96, False),
                                                      (3, 64, True)])  # fmt: skip
def test_the_stated_bound_holds_and_is_not_vacuous(layers, tokens, all_logits):
    """estimate_bytes (what --estimate-memory-gib sizes batches by) is above the measured peak,
    by less than a factor 2.5 (a bound far above the truth would waste the memory it saves)."""
    from culture_neurons.instrument.attribution import estimate_bytes, items_within
    from culture_neurons.scoring.estimate import lm_nll

    vocab = 4096 if all_logits else 128
    model = llama(layers, vocab)
    ids = torch.randint(0, vocab, (B, tokens), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, tokens, dtype=torch.long)
    mask[0, -3:] = 0
    if all_logits:
        batch, quantities = {"input_ids": ids, "attention_mask": mask}, lm_nll(ids, mask)
    else:
        batch = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1}
        quantities = lambda out: out.logits[:, -1, :3]  # noqa: E731
    attribute(model, batch, quantities)
    peak = peak_bytes(lambda: attribute(model, batch, quantities))
    bound = estimate_bytes(model, B, tokens, all_logits=all_logits)
    chunks = 2 * (1 << 24) * 4  # the reduction's chunks: a fixed allowance, unused at this size
    assert peak <= bound, (peak, bound)
    assert bound - chunks < 2.5 * peak, (peak, bound - chunks)
    # The batch rule: the largest count of items within the bound, never below 1.
    assert items_within(model, bound, tokens, most=64, all_logits=all_logits) >= B
    assert items_within(model, 1, tokens, most=64, all_logits=all_logits) == 1
    assert items_within(model, 1e15, tokens, most=5, all_logits=all_logits) == 5
