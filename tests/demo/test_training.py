"""The toy's training: the firing penalty is the mean relu of the MLP gates over real tokens,
neurons and layers, checked against gate_proj's own outputs; frozen token embeddings stay at
their init while the rest learns."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from culture_neurons.data.synthetic import make_synthetic_items
from culture_neurons.demo.toy import ToyConfig, toy_model, toy_processor
from culture_neurons.demo.training import _GateRecorder, train
from culture_neurons.models.adapters import decoder_mlps

SMALL = ToyConfig(cultures=2, hidden=32, intermediate=24, layers=2)


def test_firing_penalty_is_the_mean_relu_of_the_gates_over_real_tokens():
    processor = toy_processor(SMALL)
    model = toy_model(processor, SMALL, seed=0)
    gen = torch.Generator().manual_seed(1)
    rows, T = 3, 7
    ids = torch.randint(0, 200, (rows, T), generator=gen)
    mask = torch.ones(rows, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as encode() pads
    mask[2, :1] = 0
    # Reference: gate_proj's outputs, read from the projection itself (not the activation's input).
    seen = []
    handles = [mlp.gate_proj.register_forward_hook(lambda m, a, out: seen.append(out))
               for mlp in decoder_mlps(model)]  # fmt: skip
    recorder = _GateRecorder(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        found = float(recorder.firing(mask))
    finally:
        recorder.remove()
        for h in handles:
            h.remove()
    assert len(seen) == SMALL.layers and recorder.values == []
    per_layer = []
    for g in seen:
        real = g[mask.bool()]  # [real tokens, N]
        per_layer.append(float(F.relu(real).mean()))
    expected = sum(per_layer) / len(per_layer)
    assert expected > 0
    assert abs(found - expected) < 1e-6 * max(1.0, expected)  # fp32 sums in another order
    # Removed: a forward records nothing more.
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert recorder.values == []


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_embeddings_stay_at_their_init_and_the_decoder_still_learns(freeze):
    """freeze_embeddings: training leaves the token embeddings bit for bit at their random
    init (and trainable again afterwards) while the decoder's MLPs and lm_head move; without
    it the embeddings move too."""
    config = replace(SMALL, steps=2, warmup=1, batch_size=4, freeze_embeddings=freeze)
    processor = toy_processor(config)
    model = toy_model(processor, config, seed=0)
    items = list(make_synthetic_items(2, 4, seed=0, words_per_category=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, processor, items, config, seed=0)
    after = model.state_dict()
    embed = "model.language_model.embed_tokens.weight"
    assert embed in before
    assert torch.equal(after[embed], before[embed]) == freeze
    gate = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(after[gate], before[gate])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(p.requires_grad for p in model.parameters())
