"""Recording stays on the activations' device and never waits for it.

Without a GPU the proof runs on PyTorch's ``meta`` device: its tensors have shapes but no data,
so every host read (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, a copy to the host)
raises. A path that runs on meta tensors therefore reads nothing back per call: no host sync on
a GPU either. The GPU test checks the same with CUDA's sync debug mode set to "error".
"""

from __future__ import annotations

import pytest
import torch
from conftest import short_batch

import culture_neurons as cn
from culture_neurons.instrument import Totals, reduce
from culture_neurons.instrument import functional as F
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.stats import Fingerprint, Stats
from culture_neurons.testing.tiny import tiny_model

CULTURES = ["ja", "mx", "ng"]
FP = Fingerprint("llama", "llama", 3, 16, 8, "silu", "test")
META = torch.device("meta")


def masks_of(fp: Fingerprint) -> Masks:
    N = fp.num_neurons
    return Masks.from_sets(["a", "b"], [torch.tensor([1, N + 2]), torch.tensor([2 * N + 5])], fp)


def test_functional_statistics_stay_on_the_activations_device():
    totals, masks = Totals(CULTURES, FP), masks_of(FP)
    item = torch.tensor([0, 2])  # per-item ids on the CPU: moved without a blocking copy
    weights = torch.ones(2, 5, dtype=torch.long, device=META)
    F.count_tokens(totals, item, weights)
    F.count_items(totals, torch.tensor([0, 2], device=META))
    for layer in range(FP.num_layers):
        a = torch.empty(2, 5, 16, device=META)
        F.accumulate(totals, layer, F.ablate(a, masks, layer, item), item, weights)
        F.ablate_(a, masks, layer, torch.tensor([1, -1], device=META))
        h = F.accumulate_mlp(totals, layer, a, a, item, weights, masks=masks, set_ids=item)
        assert h.device == META
    for layer in range(FP.num_layers):
        assert {t.device for t in totals.layer(layer, META)} == {META}
    assert {t.device for t in totals.counts(META)} == {META}
    assert "on meta" in repr(totals) and "cpu" not in repr(totals)
    with pytest.raises(NotImplementedError):  # stats() is the one copy to the host
        totals.stats()


def test_the_stats_compatibility_path_does_copy_to_the_host():
    """The same call into a CPU Stats folds into it: on meta activations that copy fails, which
    shows the test above would catch a host copy."""
    with pytest.raises(NotImplementedError):
        F.accumulate(Stats.zeros(CULTURES, FP), 0, torch.empty(2, 5, 16, device=META), 0)


def test_reduction_and_ablation_never_read_the_data():
    C, N = 4, 16
    K = torch.zeros(C, N, dtype=torch.int64, device=META)
    S = torch.zeros(C, N, dtype=torch.float64, device=META)
    Q = torch.zeros(C, N, dtype=torch.float64, device=META)
    a = torch.empty(300, N, dtype=torch.bfloat16, device=META)
    ids = torch.empty(300, dtype=torch.int64, device=META)
    reduce.accumulate(K, S, Q, a, ids, chunk_rows=64)
    keep = torch.empty(2, N, dtype=torch.uint8, device=META)
    reduce.ablate_(a, keep, ids, 0.0, chunk_rows=64)
    reduce.ablate_(a, keep, ids, 1.5, chunk_rows=64)


@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_set_batch_leaves_device_ids_where_they_are(backend):
    """Culture and set ids given as device tensors (here meta) stay there: set_batch reads none
    of them back (the old set_batch moved them to the CPU: one sync per forward)."""
    model = tiny_model("llama")
    inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=META) for k, v in short_batch().items()}
    fp = adapters.fingerprint(model)
    with cn.Instrument(model, CULTURES, masks_of(fp), backend=backend) as inst:
        inst.set_batch(torch.tensor([0, 2, -1], device=META),
                       set_ids=torch.tensor([1, -1, 0], device=META), **inputs)  # fmt: skip
        batch = inst._batch
        assert batch.culture.device == META and batch.counts.device == META
        culture, set_ids = batch.on(META, inputs["input_ids"].shape[1])
        assert culture.device == set_ids.device == META and set_ids.shape == culture.shape
        inst._commit_counts(batch)  # T and items counted where the ids are
        assert {t.device for t in inst.totals.counts(META)} == {META}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["hooks", "fused"])
def test_no_host_sync_per_forward_on_cuda(backend):
    """set_batch (CPU list and CUDA tensor ids), each decoder MLP of the Instrument, staging
    and its commit, and the functional calls, all under CUDA's sync debug mode "error". The model's own forward is
    left out (transformers' mask code may sync): the MLPs are called on captured inputs."""
    model = tiny_model("llama").cuda()
    inputs = {k: v.cuda() for k, v in short_batch().items()}
    fp = adapters.fingerprint(model)
    masks = masks_of(fp)
    mlps = adapters.decoder_mlps(model)
    xs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: xs.append(args[0])) for m in mlps]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    totals = Totals(CULTURES, fp)
    item = torch.tensor([0, 2, -1], device="cuda")
    w = inputs["attention_mask"]
    with cn.Instrument(model, CULTURES, masks, backend=backend) as inst, torch.no_grad():
        keep = torch.tensor([True, False, True], device="cuda")
        for culture in ([0, 2, -1], item):  # warm: kernels compiled, totals and slots allocated
            for stage in (False, True):
                inst.set_batch(culture, set_ids=[1, -1, 0], stage=stage, **inputs)
                for mlp, x in zip(mlps, xs, strict=True):
                    mlp(x)
                if stage:
                    inst.commit(keep)
            F.count_tokens(totals, culture, w)
            for layer, x in enumerate(xs):
                F.mlp_forward(mlps[layer], x, layer=layer, totals=totals, culture=culture,
                              weights=w, masks=masks, set_ids=item)  # fmt: skip
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for culture in ([0, 2, -1], item):
                inst.set_batch(culture, set_ids=item, **inputs)
                for mlp, x in zip(mlps, xs, strict=True):
                    mlp(x)
                inst.set_batch(culture, set_ids=item, stage=True, **inputs)  # one prefill
                for mlp, x in zip(mlps, xs, strict=True):
                    mlp(x)
                inst.commit(keep)  # keep on the device: the commit reads nothing back
                F.count_tokens(totals, culture, w)
                F.count_items(totals, culture)
                for layer, x in enumerate(xs):  # (act_fn carries the hooks backend's hook)
                    a = torch.nn.functional.silu(mlps[layer].gate_proj(x))
                    F.accumulate(totals, layer, a, culture, w)
                    F.mlp_forward(mlps[layer], x, layer=layer, totals=totals, culture=culture,
                                  weights=w, masks=masks, set_ids=item)  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = inst.stats()
    assert int(got.T.sum()) > 0 and int(got.K.sum()) > 0
