"""No recording path keeps per-token storage that grows with layers: the peak memory a forward
adds over the plain forward is the same for a 2-layer and an 8-layer model (same batch).

Peak = the highest live tensor bytes during the forward above those at its start
(:func:`culture_neurons.testing.memory.peak_bytes`, also what bench_record reports); the
statistics totals, allocated by a first forward, are not per-token storage and are excluded by
measuring a second one. The hook-and-store pattern is the control: it grows by one
``[rows, N]`` activation per layer, which the bound must catch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import culture_neurons as cn
from culture_neurons.instrument import Totals
from culture_neurons.instrument import functional as F
from culture_neurons.models import adapters
from culture_neurons.testing.memory import peak_bytes

CULTURES = ["ja", "mx", "ng"]
B, T, N = 4, 48, 256  # R = 192 rows per forward
ITEM = [0, 2, -1, 1]


def llama(layers: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=N, num_hidden_layers=layers,
                                      num_attention_heads=4, vocab_size=128)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def batch() -> dict:
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding: not counted
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def act_hooks(model, hook_of):
    return [mlp.act_fn.register_forward_hook(hook_of(layer))
            for layer, mlp in enumerate(adapters.decoder_mlps(model))]  # fmt: skip


def instrument(backend):
    def attach(model, inputs):
        rec = cn.record(model, CULTURES, backend=backend)
        return lambda: rec(ITEM, **inputs), rec.detach

    return attach


def functional(model, inputs):
    totals = Totals(CULTURES, adapters.fingerprint(model))
    item, mask = torch.tensor(ITEM), inputs["attention_mask"]

    def hook_of(layer):
        return lambda module, args, a: F.accumulate(totals, layer, a, item, mask)

    handles = act_hooks(model, hook_of)

    def forward():
        F.count_tokens(totals, item, mask)
        model(**inputs)

    return forward, lambda: [h.remove() for h in handles]


def functional_mlp(model, inputs):
    totals = Totals(CULTURES, adapters.fingerprint(model))
    item, mask = torch.tensor(ITEM), inputs["attention_mask"]

    def hook_of(layer):
        def replace(mlp, args, out):
            return F.mlp_forward(mlp, args[0], layer=layer, totals=totals, culture=item,
                                 weights=mask)  # fmt: skip

        return replace

    mlps = adapters.decoder_mlps(model)
    handles = [mlp.register_forward_hook(hook_of(layer)) for layer, mlp in enumerate(mlps)]
    return lambda: model(**inputs), lambda: [h.remove() for h in handles]


def nnsight_trace(model, inputs):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed (pip install nnsight)")
    from culture_neurons.interop import record_in_trace

    lm = nnsight.NNsight(copy.deepcopy(model))  # wrapping patches modules: not the shared one
    totals, item = Totals(CULTURES, adapters.fingerprint(model)), torch.tensor(ITEM)

    def forward():
        with lm.trace(**inputs):
            record_in_trace(lm, totals, item, inputs["attention_mask"])

    return forward, lambda: None


def store(model, inputs):
    """The control: run_with_cache style, every layer's activation kept until the end."""
    cache = []
    handles = act_hooks(model, lambda layer: lambda module, args, a: cache.append(a.detach()))

    def forward():
        cache.clear()
        model(**inputs)
        for a in cache:  # reduced after the forward (here just a sum)
            a.float().sum(0)
        cache.clear()

    return forward, lambda: [h.remove() for h in handles]


PATHS = {"hooks": instrument("hooks"), "fused": instrument("fused"), "functional": functional,
         "functional_mlp": functional_mlp, "nnsight": nnsight_trace}  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {layers: llama(layers) for layers in (2, 8)}


def extra_peak(model, attach) -> int:
    """Peak bytes of the path's second forward minus the plain forward's."""
    inputs = batch()
    with torch.no_grad():
        plain = peak_bytes(lambda: model(**inputs))
        forward, detach = attach(model, inputs)
        try:
            forward()  # the first forward allocates the totals
            return peak_bytes(forward) - plain
        finally:
            detach()


ROW_BYTES = B * T * N * 4  # one layer's [rows, N] fp32 activation


@pytest.mark.parametrize("path", list(PATHS))
def test_recording_memory_does_not_grow_with_layers(models, path):
    two, eight = (extra_peak(models[layers], PATHS[path]) for layers in (2, 8))
    # Six more layers: per-token storage of any of them would add >= 6 x [rows, N] (x 2 bytes
    # even in bf16); a quarter of one is the allowance for allocator-order jitter.
    assert eight - two < ROW_BYTES / 4, f"{path}: +{eight - two} bytes from 2 to 8 layers"
    # A guard, not the target (one [rows, N] over plain, bench_record's peak_mib): the fused
    # op's CPU path holds gate, up, h, an act chunk and the reduction's chunk at once, ~2.1x.
    assert two < 3 * ROW_BYTES, f"{path}: {two} bytes over the plain forward"


def test_the_bound_catches_hook_and_store(models):
    two, eight = (extra_peak(models[layers], store) for layers in (2, 8))
    assert eight - two >= 6 * ROW_BYTES * 0.9, "the control must fail the bound above"
