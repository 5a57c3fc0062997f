"""The toy's training objective: the firing penalty is the mean relu of the MLP gates over
real tokens, neurons and layers, checked against gate_proj's own outputs."""

import torch
import torch.nn.functional as F

from culture_neurons.demo.toy import ToyConfig, toy_model, toy_processor
from culture_neurons.demo.training import _GateRecorder
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
