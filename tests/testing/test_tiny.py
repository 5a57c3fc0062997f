"""The tiny offline models: every family builds, runs a padded batch and is what it claims."""

import functools

import pytest
import torch

from culture_neurons.errors import UnsupportedModelError, UsageError
from culture_neurons.testing.tiny import (
    TINY_FAMILIES,
    VLM_FAMILIES,
    tiny_batch,
    tiny_image,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)

# What the real chat template of each family puts right before the question text.
PROMPT_PARTS = {
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|>",
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|><|image_pad|>",
    "llava": "USER: <image>",
    "llava_next": "[INST] <image>",
    "llava_next_qwen2": "<|im_start|>user\n<image>",
    "gemma3": "<start_of_turn>user\n\n\n<start_of_image><image_soft_token>",
    "gemma3_text": "<start_of_turn>user\nWhat is shown?",
    "llama": "[INST] What is shown?",
    "mistral": "[INST] What is shown?",
    "qwen2": "<|im_start|>user\nWhat is shown?",
}
GENERATION_PROMPT_END = {
    "qwen2_vl": "<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "llava": " ASSISTANT:",
    "llava_next": " [/INST]",
    "llava_next_qwen2": "<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>model\n",
    "gemma3_text": "<start_of_turn>model\n",
    "llama": " [/INST]",
    "mistral": " [/INST]",
    "qwen2": "<|im_start|>assistant\n",
}


@functools.cache
def _model(name):
    return tiny_model(name)


def _decoder_layers(name, model):
    inner = model.model.language_model if name in VLM_FAMILIES else model.model
    return inner.layers


def _tokenizer_of(name, processor):
    return processor.tokenizer if name in VLM_FAMILIES else processor


def test_family_lists():
    assert set(VLM_FAMILIES) < set(TINY_FAMILIES)
    assert set(PROMPT_PARTS) == set(TINY_FAMILIES)
    with pytest.raises(UnsupportedModelError, match="qwen2_5_vl"):
        tiny_model("gpt2")


@pytest.mark.parametrize("name", TINY_FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_on_padded_batch(name, side):
    model, processor = _model(name), tiny_processor(name)
    batch = tiny_batch(name, processor, padding_side=side)
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3, "prompts should differ in length"
    pad_column = 0 if side == "left" else -1
    assert (mask[:, pad_column] == 0).sum() == 2, f"expected {side} padding"
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    # The processor's own tokenizer keeps its padding side: tiny_batch must not leak it.
    assert _tokenizer_of(name, processor).padding_side == "right"


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_image_tokens_match_vision_features(name):
    model, processor = _model(name), tiny_processor(name)
    batch = tiny_batch(name, processor)
    image_token_id = model.config.image_token_id
    assert processor.tokenizer.image_token_id == image_token_id
    image_inputs = {
        k: batch[k] for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in batch
    }
    with torch.no_grad():
        out = model.model.get_image_features(**image_inputs)
    features = getattr(out, "pooler_output", out)  # one [n_i, hidden] block per image
    expected = [len(f) for f in features]
    got = (batch["input_ids"] == image_token_id).sum(1).tolist()
    assert got == expected
    assert min(got) > 0


def test_image_token_counts_vary_with_aspect_ratio():
    """Dynamic resolution (Qwen) and tiling (LLaVA-NeXT) give rows different image lengths."""
    for name in ("qwen2_5_vl", "llava_next"):
        batch = tiny_batch(name, tiny_processor(name))
        counts = (batch["input_ids"] == _model(name).config.image_token_id).sum(1)
        assert len(set(counts.tolist())) == 3, (name, counts)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_same_seed_same_weights(name):
    a, b, c = tiny_model(name, seed=0), tiny_model(name, seed=0), tiny_model(name, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert not a.training


def test_seeded_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_decoder_layers_and_gated_mlps(name):
    model = _model(name)
    text = model.config.get_text_config()
    layers = _decoder_layers(name, model)
    assert len(layers) == text.num_hidden_layers
    mlp = layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == text.intermediate_size
    assert mlp.down_proj.in_features == text.intermediate_size
    if name in VLM_FAMILIES:
        # A vision MLP of the same width would hide a hook placed on the wrong tower.
        vision = model.config.vision_config
        vision_width = getattr(vision, "intermediate_size", None) or int(
            vision.embed_dim * vision.mlp_ratio
        )
        assert vision_width != text.intermediate_size


def test_qwen2_5_vl_vision_mlps_are_gated_but_apart():
    model = _model("qwen2_5_vl")
    vision_mlp = model.model.visual.blocks[0].mlp
    decoder_mlp = model.model.language_model.layers[0].mlp
    assert hasattr(vision_mlp, "gate_proj")  # the trap: same names as the decoder's
    assert vision_mlp.gate_proj.out_features != decoder_mlp.gate_proj.out_features


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_chat_template_matches_family(name):
    processor = tiny_processor(name)
    tok = _tokenizer_of(name, processor)
    batch = tiny_batch(name, processor, n=1)
    text = tok.decode(batch["input_ids"][0])
    assert PROMPT_PARTS[name] in text
    assert text.endswith(GENERATION_PROMPT_END[name])


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_tokenizer_covers_any_text_and_answer_letters(name):
    tok = tiny_tokenizer(name)
    text = "Qué es esto? 日本の祭り — Ça va."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    for letter in "ABCD":  # scored as single next tokens, with and without a leading space
        assert len(tok(letter, add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(" " + letter, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok) <= _model(name).config.get_text_config().vocab_size


def test_tokenizers_are_fresh_objects():
    a, b = tiny_tokenizer("llava"), tiny_tokenizer("llava")
    a.padding_side = "left"
    assert b.padding_side == "right"


def test_tiny_image():
    image = tiny_image(3, size=(40, 72))
    assert image.mode == "RGB" and image.size == (40, 72)
    assert image.tobytes() == tiny_image(3, size=(40, 72)).tobytes()
    assert image.tobytes() != tiny_image(4, size=(40, 72)).tobytes()
    assert len(set(image.tobytes()[i : i + 3] for i in range(0, 40 * 72 * 3, 3))) > 1


def test_bad_padding_side():
    with pytest.raises(UsageError, match="padding_side"):
        tiny_batch("qwen2", tiny_processor("qwen2"), padding_side="middle")
