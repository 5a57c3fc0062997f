"""Tiny models of every supported family: random weights, real code paths (the builders that
:mod:`culture_neurons.testing.tiny` and the trained toy of :mod:`culture_neurons.demo.toy` share).

Each family is the real transformers class (so module paths, activations, image-token
expansion and padding behave as in the 7B checkpoints) with every size shrunk so that all of
them together build and run a forward in a few seconds on a CPU. The real size sits beside
each shrunk value in a comment. Nothing is downloaded: tokenizers are trained in code on a
small corpus (byte-level BPE, so any text tokenizes) and cached in-process
(:mod:`.tiny_tokenizers`).

    model = tiny_model("qwen2_5_vl")
    processor = tiny_processor("qwen2_5_vl")
    # test inputs: culture_neurons.testing.tiny (tiny_batch, tiny_image)

Where the decoder MLPs live (L layers, N neurons = intermediate_size; transformers 5.x):
    VLMs (all six)      model.model.language_model.layers[l].mlp    gate_proj, up_proj, down_proj
    causal LMs          model.model.layers[l].mlp
Vision towers, whose MLPs must never be counted:
    qwen2_vl            model.model.visual.blocks[i].mlp                fc1/fc2, quick_gelu
    qwen2_5_vl          model.model.visual.blocks[i].mlp                GATED: gate/up/down, silu
    llava, llava_next*  model.model.vision_tower.encoder.layers[i].mlp  fc1/fc2, quick_gelu (CLIP)
    gemma3              model.model.vision_tower.encoder.layers[i].mlp  fc1/fc2, gelu tanh (SigLIP)
(and model.model.visual.merger.mlp, a Sequential, in both Qwen-VL families.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)

from culture_neurons.errors import UnsupportedModelError
from culture_neurons.models.loading import no_video
from culture_neurons.models.tiny_tokenizers import (  # re-exported: tiny's public names
    QWEN_IMAGE,
    TOKENIZERS,
    TokenizerSpec,
    build_tokenizer,
    chatml,
    corpus,
    gemma,
    inst,
    vicuna,
)

__all__ = [
    "TINY_FAMILIES",
    "VLM_FAMILIES",
    "TokenizerSpec",
    "chat_template",
    "corpus",
    "special_tokens",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
]

# ----------------------------------------------------------------------------------------------
# Shared sizes. Decoder MLP width (96) differs from every vision MLP width (80) and from the
# hidden size (64), so code that grabs the wrong MLP fails on shapes instead of passing quietly.
# ----------------------------------------------------------------------------------------------
HIDDEN = 64  # Qwen2-7B 3584, Llama-2/Mistral-7B 4096, Gemma3-4B 2560
INTERMEDIATE = 96  # Qwen2-7B 18944, Vicuna-7B 11008, Mistral-7B 14336, Gemma3-4B 10240
LAYERS = 3  # Qwen2-7B 28, Llama-2/Mistral-7B 32, Gemma3-4B 34
HEADS = 4  # Qwen2-7B 28, Llama-2/Mistral-7B 32, Gemma3-4B 8
HEAD_DIM = HIDDEN // HEADS  # 16; real 128 (Gemma3 256)
VISION_HIDDEN = 32  # CLIP ViT-L/14 1024, Qwen2-VL ViT 1280, SigLIP-400M 1152
VISION_INTERMEDIATE = 80  # CLIP 4096, Qwen2-VL 5120, Qwen2.5-VL 3420, SigLIP 4304
VISION_LAYERS = 2  # CLIP 24, Qwen2(.5)-VL 32, SigLIP 27
VISION_HEADS = 2  # CLIP/Qwen-ViT 16, SigLIP 16
PATCH = 14  # same as real (CLIP, Qwen-ViT, SigLIP-so400m/14)
IMAGE = 56  # square input of CLIP / SigLIP towers: LLaVA 336, Gemma3 896
VOCAB_MULTIPLE = 64  # real checkpoints pad the embedding past the tokenizer (152064 > 151665)

_GEMMA_IMAGE_TOKENS = 4  # Gemma3 256: its 4x4 patches average-pooled to 2x2

_ATTN = "eager"  # works offline for every family here; exact, so tests can compare numbers


# ----------------------------------------------------------------------------------------------
# Config helpers shared by the families.
# ----------------------------------------------------------------------------------------------
def _vocab_size(tok: PreTrainedTokenizerFast) -> int:
    return -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _ids(tok: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _decoder(tok: PreTrainedTokenizerFast, **overrides) -> dict:
    """Decoder sizes common to every family; overrides carry what differs."""
    kwargs = dict(
        vocab_size=_vocab_size(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,  # GQA as Qwen2-7B (28/4) and Mistral-7B (32/8)
        max_position_embeddings=512,  # real 32768+; prompts here are < 200 tokens
        **_ids(tok),
    )
    kwargs.update(overrides)
    return kwargs


def _clip_vision() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 of LLaVA-1.5 and LLaVA-NeXT, shrunk (hidden_act quick_gelu)."""
    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE,  # 336
        patch_size=PATCH,
        projection_dim=VISION_HIDDEN,  # 768, unused by LLaVA
    )


def _qwen_text(tok: PreTrainedTokenizerFast, **text) -> dict:
    # mrope_section splits head_dim / 2 = 8 rotary frequencies over (t, h, w); real [16, 24, 24].
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    return _decoder(tok, **{"rope_parameters": rope, **text})


def _qwen_vl_tokens(tok: PreTrainedTokenizerFast) -> dict:
    return {
        name: tok.convert_tokens_to_ids(t)
        for name, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }


# ----------------------------------------------------------------------------------------------
# One builder per family: (tokenizer) -> (model class, config).
# ----------------------------------------------------------------------------------------------
def _qwen2_vl(tok, **text):
    vision = dict(
        depth=VISION_LAYERS,
        embed_dim=VISION_INTERMEDIATE // 2,  # 1280; 40 here since mlp_ratio must be an int
        mlp_ratio=2,  # 4 -> fc1 width 80 (5120)
        num_heads=VISION_HEADS,
        hidden_size=text.get("hidden_size", HIDDEN),  # merger output = decoder hidden
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,  # as real
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text(tok, **text), vision_config=vision, **_qwen_vl_tokens(tok)
    )
    return Qwen2VLForConditionalGeneration, config


def _qwen2_5_vl(tok, **text):
    # The vision blocks have GATED MLPs (gate_proj/up_proj/down_proj, SiLU) named exactly like
    # the decoder's: only model.model.language_model.layers[l].mlp are neurons of the paper.
    vision = dict(
        depth=VISION_LAYERS,
        hidden_size=VISION_HIDDEN,  # 1280
        intermediate_size=VISION_INTERMEDIATE,  # 3420
        num_heads=VISION_HEADS,
        out_hidden_size=text.get("hidden_size", HIDDEN),  # 3584 = decoder hidden
        window_size=56,  # 112 px: 2x2 merged patches per window, so larger images use windows
        fullatt_block_indexes=[VISION_LAYERS - 1],  # [7, 15, 23, 31]
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok, **text), vision_config=vision, **_qwen_vl_tokens(tok)
    )
    return Qwen2_5_VLForConditionalGeneration, config


def _llava(tok, **text):
    text = LlamaConfig(**_decoder(tok, **{"num_key_value_heads": HEADS, **text}))  # Vicuna: no GQA
    config = LlavaConfig(
        vision_config=_clip_vision(),
        text_config=text,
        image_token_index=tok.image_token_id,  # 32000
        image_seq_length=(IMAGE // PATCH) ** 2,  # 576
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop CLS
    )
    return LlavaForConditionalGeneration, config


# LLaVA-NeXT tiles: a base view plus up to 2x2 crops; real pinpoints are multiples of 336.
_GRID_PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]


def _llava_next_with(text_config):
    def build(tok, **text):
        config = LlavaNextConfig(
            vision_config=_clip_vision(),
            text_config=text_config(**_decoder(tok, **text)),
            image_token_index=tok.image_token_id,  # 32000 (Mistral), 151646 (Pangea)
            image_grid_pinpoints=_GRID_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        return LlavaNextForConditionalGeneration, config

    return build


def _gemma3_text_config(tok, **text) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **_decoder(
            tok,
            **text,
            head_dim=HEAD_DIM,  # 256
            query_pre_attn_scalar=HEAD_DIM,  # 256
            # Gemma names the key hidden_activation (hidden_act is absent from its config).
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=16,  # 1024; shorter than the prompts so sliding layers really slide
            layer_types=["sliding_attention"] * (LAYERS - 1) + ["full_attention"],  # 5:1 pattern
        )
    )


def _gemma3(tok, **text):
    config = Gemma3Config(
        text_config=_gemma3_text_config(tok, **text),
        vision_config=SiglipVisionConfig(
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTERMEDIATE,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS,
            image_size=IMAGE,  # 896
            patch_size=PATCH,
            vision_use_head=False,
        ),
        mm_tokens_per_image=_GEMMA_IMAGE_TOKENS,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    return Gemma3ForConditionalGeneration, config


def _causal(model_cls, config_cls, **overrides):
    def build(tok, **text):
        return model_cls, config_cls(**_decoder(tok, **{**overrides, **text}))

    return build


@dataclass(frozen=True)
class _Family:
    build: Callable  # (tokenizer, **decoder overrides) -> (model class, config)
    tokenizer: str  # key of TOKENIZERS
    template: str  # chat template
    processor: Callable | None = None  # (tokenizer, template) -> processor; None: text-only


# ----------------------------------------------------------------------------------------------
# Processors: the family's Processor with its *ImageProcessorPil (torchvision-free) at tiny sizes.
# ----------------------------------------------------------------------------------------------
# Transformers' video processors need torchvision, absent beside the CPU torch: no video.
_TinyQwen2VLProcessor = no_video(Qwen2VLProcessor)
_TinyQwen2_5_VLProcessor = no_video(Qwen2_5_VLProcessor)


def _qwen_processor(cls):
    def build(tok, template):
        image_processor = Qwen2VLImageProcessorPil(
            # min/max pixels: real 56*56 and 28*28*16384; the cap keeps images <= 64 patches.
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
            patch_size=PATCH,
            temporal_patch_size=2,
            merge_size=2,
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=None,
            chat_template=template,
        )

    return build


def _llava_processor(cls, image_processor_cls, **image_kwargs):
    def build(tok, template):
        image_processor = image_processor_cls(
            size={"shortest_edge": IMAGE},
            crop_size={"height": IMAGE, "width": IMAGE},
            **image_kwargs,
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, which "default" drops again
            chat_template=template,
        )

    return build


def _gemma3_processor(tok, template):
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=template,
        image_seq_length=_GEMMA_IMAGE_TOKENS,
    )


_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _Family(
        _qwen2_vl, "qwen", chatml(QWEN_IMAGE), _qwen_processor(_TinyQwen2VLProcessor)
    ),
    "qwen2_5_vl": _Family(
        _qwen2_5_vl, "qwen", chatml(QWEN_IMAGE), _qwen_processor(_TinyQwen2_5_VLProcessor)
    ),
    # LLaVA-1.5: CLIPImageProcessor in the real checkpoint (resize + centre crop, no tiling).
    "llava": _Family(
        _llava,
        "llama_llava",
        vicuna("<image>\n"),
        _llava_processor(LlavaProcessor, CLIPImageProcessorPil),
    ),
    "llava_next": _Family(
        _llava_next_with(MistralConfig),
        "llama_llava",
        inst("<image>\n"),
        _llava_processor(
            LlavaNextProcessor, LlavaNextImageProcessorPil, image_grid_pinpoints=_GRID_PINPOINTS
        ),
    ),
    # Pangea-7B: LLaVA-NeXT on Qwen2-7B with a chatml template.
    "llava_next_qwen2": _Family(
        _llava_next_with(Qwen2Config),
        "qwen_llava",
        chatml("<image>\n"),
        _llava_processor(
            LlavaNextProcessor, LlavaNextImageProcessorPil, image_grid_pinpoints=_GRID_PINPOINTS
        ),
    ),
    "gemma3": _Family(_gemma3, "gemma", gemma("<start_of_image>"), _gemma3_processor),
    "gemma3_text": _Family(
        lambda tok, **text: (Gemma3ForCausalLM, _gemma3_text_config(tok, **text)), "gemma",
        gemma(),
    ),
    "llama": _Family(
        _causal(LlamaForCausalLM, LlamaConfig, num_key_value_heads=HEADS), "llama_text", inst()
    ),
    "mistral": _Family(_causal(MistralForCausalLM, MistralConfig), "llama_text", inst()),
    "qwen2": _Family(_causal(Qwen2ForCausalLM, Qwen2Config), "qwen_text", chatml()),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
VLM_FAMILIES: tuple[str, ...] = tuple(k for k, f in _FAMILIES.items() if f.processor is not None)


def _family(name: str) -> _Family:
    if name not in _FAMILIES:
        raise UnsupportedModelError(
            f"no tiny model for family {name!r}; choose one of {', '.join(TINY_FAMILIES)}"
        )
    return _FAMILIES[name]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def tiny_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of family `name` (trained once per process, then copied)."""
    family = _family(name)
    return build_tokenizer(TOKENIZERS[family.tokenizer], family.template)


def tiny_processor(
    name: str, tokenizer: PreTrainedTokenizerFast | None = None
) -> ProcessorMixin | PreTrainedTokenizerFast:
    """The family's processor (VLMs) or tokenizer (text-only), consistent with tiny_model(name):
    same special-token ids, image sizes and image-token expansion. Fresh object on every call.
    ``tokenizer``: build the processor over this one instead (it must carry the family's
    special tokens, see :func:`special_tokens`)."""
    family = _family(name)
    tok = tokenizer if tokenizer is not None else tiny_tokenizer(name)
    return tok if family.processor is None else family.processor(tok, family.template)


def special_tokens(name: str) -> TokenizerSpec:
    """The special tokens of family ``name``'s tokenizer (ids 0.. ``head``, then ``tail``)."""
    return TOKENIZERS[_family(name).tokenizer]


def chat_template(name: str) -> str:
    """Family ``name``'s chat template (close to the real checkpoint's)."""
    return _family(name).template


def tiny_config(name: str, tokenizer: PreTrainedTokenizerFast | None = None, **decoder):
    """``(model class, config)`` of family ``name`` at the tiny sizes, ``decoder`` overriding
    decoder config fields (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``...;
    Qwen-VL families also size the vision merger to ``hidden_size``)."""
    family = _family(name)
    return family.build(tokenizer if tokenizer is not None else tiny_tokenizer(name), **decoder)


def tiny_model(name: str, seed: int = 0) -> PreTrainedModel:
    """Random fp32 model of family `name` in eval mode; equal seeds give identical weights.
    The global torch RNG is left as it was."""
    model_cls, config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=_ATTN, dtype=torch.float32)
    return model.eval()
