"""The model fingerprint identifies the weights, not only the architecture (issue #12 case 1)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from culture_neurons.models.adapters import WEIGHT_SAMPLES, fingerprint, weights_hash
from culture_neurons.testing.tiny import tiny_model


def reference_hash(model) -> str:
    """The documented recipe, written independently: every state-dict tensor in name order,
    its name and shape, then an evenly strided sample of its values rounded to bfloat16."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{list(t.shape)};".encode())
        flat = t.detach().cpu().float().numpy().reshape(-1)
        n, k = flat.size, WEIGHT_SAMPLES
        picked = flat if n <= k else flat[(np.arange(k, dtype=np.int64) * n) // k]
        if picked.size:
            bf16 = torch.from_numpy(np.ascontiguousarray(picked)).to(torch.bfloat16)
            h.update(bf16.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_weights_hash_follows_the_recipe(family):
    model = tiny_model(family)
    assert weights_hash(model) == reference_hash(model)


def test_same_architecture_other_weights_differ():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa.config_hash == fb.config_hash and fa.weights_hash != fb.weights_hash
    assert [d.split(":")[0] for d in fa.differences(fb)] == ["weights"]
    assert fingerprint(tiny_model("llama", seed=0)) == fa  # the same weights again


def test_a_small_fine_tune_is_seen():
    """A change of every weight by a relative 1e-2 (a short fine-tune) changes the hash."""
    model = tiny_model("llama")
    before = weights_hash(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    assert weights_hash(model) != before


def test_one_checkpoint_hashes_the_same_in_float32_and_bfloat16(tmp_path):
    model = tiny_model("qwen2_5_vl")
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForImageTextToText

    loaded = {dt: AutoModelForImageTextToText.from_pretrained(tmp_path / "m", dtype=dt)
              for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
    hashes = {dt: weights_hash(m) for dt, m in loaded.items()}
    assert hashes[torch.float32] == hashes[torch.bfloat16] == weights_hash(model)


@pytest.mark.gpu
def test_the_hash_does_not_depend_on_the_device():
    model = tiny_model("qwen2_5_vl")
    assert weights_hash(model.to("cuda")) == weights_hash(model.cpu())
