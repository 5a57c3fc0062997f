"""The hooks backend against the independent reference, on the tiny model of every family."""

from __future__ import annotations

import pytest
import torch
from stats_reference import assert_stats_equal, capture_mlp_inputs, reference_stats

import culture_neurons as cn
from culture_neurons.errors import UnsupportedModelError, UsageError
from culture_neurons.models import adapters
from culture_neurons.testing.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_processor

CULTURES = ["ja", "mx", "ng"]


def batch_of(family: str, n: int = 3, padding_side: str = "right", seed: int = 0) -> dict:
    return dict(tiny_batch(family, tiny_processor(family), n=n, seed=seed, padding_side=padding_side))


def record_hooks(model, inputs, culture, scope="all", activation="gate", backend="hooks"):
    with cn.record(model, CULTURES, scope=scope, activation=activation, backend=backend) as rec:
        with torch.no_grad():
            rec(culture, **inputs)
        return rec.stats()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hooks_equal_reference_every_family(family):
    model = tiny_model(family)
    inputs = batch_of(family)
    culture = [0, 2, 0]  # a batch mixing cultures
    stats = record_hooks(model, inputs, culture)
    assert_stats_equal(stats, reference_stats(model, inputs, culture, len(CULTURES)))
    assert stats.items.tolist() == [2, 0, 1]
    # Vision-tower MLPs are never recorded: one layer per decoder layer of the text config.
    assert stats.shape[1] == adapters.text_config(model).num_hidden_layers


@pytest.mark.parametrize("scope", ["all", "text", "image", "last"])
@pytest.mark.parametrize("activation", ["gate", "post"])
def test_scopes_and_activations(scope, activation):
    family = "qwen2_5_vl"  # its vision tower has gated MLPs too: they must stay out
    model = tiny_model(family)
    inputs = batch_of(family, padding_side="left")
    culture = [1, -1, 1]  # -1: an item that is not counted
    stats = record_hooks(model, inputs, culture, scope=scope, activation=activation)
    ref = reference_stats(model, inputs, culture, len(CULTURES), scope, activation)
    assert_stats_equal(stats, ref)
    assert stats.T[1] > 0 and stats.T[0] == 0 and stats.T[2] == 0


def test_image_scope_counts_image_tokens_only():
    model = tiny_model("llava")
    inputs = batch_of("llava")
    image_id = adapters.image_token_ids(model)
    n_image = sum(int((inputs["input_ids"][b] == i).sum()) for b in range(3) for i in image_id)
    stats = record_hooks(model, inputs, [0, 0, 0], scope="image")
    assert stats.T[0] == n_image > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llama"])
def test_padding_side_and_batching_do_not_change_stats(family):
    # Padding changes the model's reduction shapes, so its MLP inputs agree to ~1e-7 only;
    # no gate value of these seeded inputs is that close to 0, so counts must match exactly.
    model = tiny_model(family)
    culture = [0, 1, 2]
    stats = {side: record_hooks(model, batch_of(family, padding_side=side), culture)
             for side in ("left", "right")}  # fmt: skip
    alone = []
    for b in range(3):
        inputs = batch_of(family, padding_side="right")
        one = _select_item(inputs, b)
        alone.append(record_hooks(model, one, [culture[b]]))
    merged = alone[0].merge(*alone[1:])
    for other in (stats["right"], merged):
        assert_stats_equal(stats["left"], {n: getattr(other, n) for n in "TKSQ"}, rtol=1e-5)


def _select_item(inputs: dict, b: int) -> dict:
    """Item b of a right-padded batch alone, padding removed (pixel tensors kept per item)."""
    length = int(inputs["attention_mask"][b].sum())
    out = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            out[k] = v[b : b + 1, :length]
        elif k in ("pixel_values", "image_sizes", "image_grid_thw") and v.shape[0] == 3:
            out[k] = v[b : b + 1]
        elif k == "pixel_values":  # Qwen-VL: patches of all images concatenated
            sizes = inputs["image_grid_thw"].prod(-1).tolist()
            start = sum(sizes[:b])
            out[k] = v[start : start + sizes[b]]
        else:
            out[k] = v
    return out


def test_merge_equals_recording_together():
    model = tiny_model("qwen2_vl")
    a, b = batch_of("qwen2_vl", seed=1), batch_of("qwen2_vl", seed=2)
    with cn.record(model, CULTURES, backend="hooks") as rec:
        with torch.no_grad():
            rec([0, 1, 2], **a)
            rec([2, 2, 0], **b)
        together = rec.stats()
    merged = record_hooks(model, a, [0, 1, 2]).merge(record_hooks(model, b, [2, 2, 0]))
    assert_stats_equal(merged, {n: getattr(together, n) for n in "TKSQ"}, rtol=1e-12)
    assert torch.equal(merged.items, together.items)


def test_outputs_unchanged_and_detach_restores_exactly():
    model = tiny_model("gemma3")
    inputs = batch_of("gemma3")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    repr_before = repr(model)
    _, before = capture_mlp_inputs(model, inputs)
    rec = cn.record(model, CULTURES, backend="hooks")
    assert "culture_neurons: hooks" in repr(model)
    with torch.no_grad():
        during = rec([0, 1, 2], **inputs).logits
    rec.detach()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert repr(model) == repr_before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_recording_requires_rows_and_full_forwards():
    model = tiny_model("llama")
    inputs = batch_of("llama")
    with cn.record(model, CULTURES, backend="hooks") as rec, torch.no_grad():
        with pytest.raises(UsageError, match="no rows were set"):
            model(**inputs)
        rec.set_batch([0, 1, 2], **inputs)
        with pytest.raises(UsageError, match="token rows"):
            model(input_ids=inputs["input_ids"][:, :2])
        with pytest.raises(UsageError, match="unknown culture"):
            rec(["ja", "xx", "ja"], **inputs)
        with pytest.raises(UsageError, match="culture ids"):
            rec.set_batch([0, 7, 0], **inputs)


def test_culture_names_and_single_id_for_all_rows():
    model = tiny_model("mistral")
    inputs = batch_of("mistral")
    by_name = record_hooks(model, inputs, ["mx", "mx", "mx"])
    by_one = record_hooks(model, inputs, 1)
    assert torch.equal(by_name.K, by_one.K) and by_name.items.tolist() == [0, 3, 0]


def test_unsupported_models_name_the_families():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported families: qwen2_vl"):
        cn.record(gpt2, CULTURES)
    relu = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=50, hidden_act="relu"))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="activation 'relu'"):
        cn.record(relu, CULTURES)
