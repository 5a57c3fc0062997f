"""Model adapters: the one place that knows model internals.

An adapter says, for one family, which ``config.model_type`` values it accepts, where the
*language model's* decoder layers are (never the vision tower's), which config fields hold
image-token ids, whether prompts carry an image and how a user turn is laid out. The
functions below answer the rest from the config (activation, image tokens, logit
soft-capping, the fingerprint). Everything else asks here; nothing else walks a model.

Every supported family computes its decoder MLP as
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; :func:`decoder_mlps` checks that shape
and the activation, and fails loudly naming the supported families otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from culture_neurons.errors import UnsupportedModelError
from culture_neurons.stats import Fingerprint

# transformers' names for the two activations whose sign equals the sign of gate_proj(x).
_ACT_FNS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id")


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    layer_paths: tuple[str, ...]  # dotted paths to the decoder layer list, tried in order
    vlm: bool  # prompts carry an image
    processor: str = ""  # transformers processor class (VLMs), to assemble one from parts
    # How the processor writes an image into the prompt text (see expanded_prompts): "repeat",
    # its image token once per image token; "sequence", its full_image_sequence (Gemma 3:
    # begin / end-of-image tokens and blank lines around a fixed count of image tokens).
    image_text: str = "repeat"
    # How a budget of image tokens per image is applied (culture_neurons.models.image_budget):
    # "pixels" (the processor's pixel bounds), "pinpoints" (LLaVA-NeXT's tile grids), "fixed"
    # (every image has the same count), "none" (text-only).
    image_budget: str = "none"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._resolve(model)[1]

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack that owns the layers (its input embeddings have images merged in;
        called with ``input_ids``/``inputs_embeds`` it returns ``last_hidden_state``)."""
        return self._resolve(model)[0]

    def _resolve(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        for path in self.layer_paths:
            parent, obj = None, model
            for part in path.split("."):
                parent, obj = obj, getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList):
                return parent, obj
        raise UnsupportedModelError(
            f"{type(model).__name__} ({self.family}) has none of the decoder layer lists "
            f"{', '.join(self.layer_paths)}; pass the HF model itself (e.g. *ForConditionalGeneration)"
        )

    def messages(self, text: str, with_image: bool | None = None) -> list[dict]:
        """One user turn for ``processor.apply_chat_template``: the image first, then the text."""
        image = self.vlm if with_image is None else with_image
        if not image:
            return [{"role": "user", "content": [{"type": "text", "text": text}]}]
        content = [{"type": "image"}, {"type": "text", "text": text}]
        return [{"role": "user", "content": content}]


_VLM_LAYERS = ("model.language_model.layers", "language_model.layers", "model.language_model.model.layers")
_LM_LAYERS = ("model.layers", "layers")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("qwen2_vl", ("qwen2_vl",), _VLM_LAYERS, vlm=True, processor="Qwen2VLProcessor",
            image_budget="pixels"),  # fmt: skip
    Adapter("qwen2_5_vl", ("qwen2_5_vl",), _VLM_LAYERS, vlm=True,
            processor="Qwen2_5_VLProcessor", image_budget="pixels"),  # fmt: skip
    Adapter("llava", ("llava",), _VLM_LAYERS, vlm=True, processor="LlavaProcessor",
            image_budget="fixed"),  # fmt: skip
    # LLaVA-1.6-Mistral and Pangea (LLaVA-NeXT on Qwen2) share this class.
    Adapter("llava_next", ("llava_next",), _VLM_LAYERS, vlm=True,
            processor="LlavaNextProcessor", image_budget="pinpoints"),  # fmt: skip
    Adapter("gemma3", ("gemma3",), _VLM_LAYERS, vlm=True, processor="Gemma3Processor",
            image_text="sequence", image_budget="fixed"),  # fmt: skip
    Adapter("gemma3_text", ("gemma3_text",), _LM_LAYERS, vlm=False),
    Adapter("llama", ("llama",), _LM_LAYERS, vlm=False),
    Adapter("mistral", ("mistral",), _LM_LAYERS, vlm=False),
    Adapter("qwen2", ("qwen2",), _LM_LAYERS, vlm=False),
)
SUPPORTED = ", ".join(a.family for a in ADAPTERS)


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def get_adapter(model_or_config) -> Adapter:
    """The adapter of a model (or its config); an error names the supported families."""
    model_type = getattr(_config(model_or_config), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported families: {SUPPORTED}"
    )


def text_config(model_or_config):
    config = _config(model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_fn(model_or_config) -> str:
    """``"silu"`` or ``"gelu_tanh"``, the decoder MLP activation."""
    tc = text_config(model_or_config)
    name = getattr(tc, "hidden_activation", None) or getattr(tc, "hidden_act", None)
    if name not in _ACT_FNS:
        raise UnsupportedModelError(
            f"decoder activation {name!r} is not supported (only SiLU and GELU-tanh, whose sign "
            f"is the sign of gate_proj(x)); supported families: {SUPPORTED}"
        )
    return _ACT_FNS[name]


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated MLP of every decoder layer of the language model, in layer order."""
    adapter = get_adapter(model)
    mlps = [getattr(layer, "mlp", None) for layer in adapter.decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        if missing_mlp_parts(mlp):
            raise UnsupportedModelError(
                f"decoder layer {i} of {type(model).__name__} has no gated MLP "
                f"({'/'.join(MLP_PARTS)}); supported families: {SUPPORTED}"
            )
    return mlps


# --- a gated MLP's parts: down_proj(act_fn(gate_proj(x)) * up_proj(x)) -------------------------
# Every other module reaches a decoder MLP's parts through these functions (they work on an
# nnsight Envoy of the MLP too), so a family that names them otherwise changes only this file.

MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def missing_mlp_parts(mlp, parts: tuple[str, ...] = MLP_PARTS) -> list[str]:
    """The names of ``parts`` that ``mlp`` lacks (``[]``: a gated MLP)."""
    return [p for p in parts if getattr(mlp, p, None) is None]


def gate_up(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_proj(x), up_proj(x))``, each ``[..., N]``."""
    return mlp.gate_proj(x), mlp.up_proj(x)


def down(mlp, h: torch.Tensor) -> torch.Tensor:
    """``down_proj(h)``: ``[..., N] -> [..., H]``."""
    return mlp.down_proj(h)


def act_module(mlp) -> nn.Module:
    """The activation module whose output is ``a = act(gate_proj(x))`` (hooks attach here)."""
    return mlp.act_fn


def down_module(mlp) -> nn.Module:
    """The down projection, whose input is ``h = a * up_proj(x)``."""
    return mlp.down_proj


def gate_weight(mlp) -> torch.Tensor:
    """``[N, H]`` weight of the gate projection (its rows are the neurons)."""
    return mlp.gate_proj.weight


def mlp_activation(mlp: nn.Module) -> str:
    """``"silu"`` or ``"gelu_tanh"``: the activation of one decoder MLP, read from the class of
    its ``act_fn`` through transformers' own name -> class table (no guessing from names)."""
    from transformers.activations import ACT2CLS

    cls = type(act_module(mlp) if not missing_mlp_parts(mlp, ("act_fn",)) else None)
    for name, entry in ACT2CLS.items():
        entry_cls = entry[0] if isinstance(entry, tuple) else entry
        if entry_cls is cls and name in _ACT_FNS:
            return _ACT_FNS[name]
    raise UnsupportedModelError(
        f"{type(mlp).__name__}.act_fn is {cls.__name__}, not SiLU or GELU-tanh (the activations "
        f"whose sign is the sign of gate_proj(x)); supported families: {SUPPORTED}"
    )


def logit_softcap(model_or_config) -> float | None:
    """The final logit soft-capping ``c`` (logits = c * tanh(logits / c); Gemma), or None."""
    return getattr(text_config(model_or_config), "final_logit_softcapping", None) or None


def image_token_ids(model_or_config) -> tuple[int, ...]:
    """Token ids whose positions carry image (or video) embeddings; empty for text-only models."""
    config = _config(model_or_config)
    ids = {getattr(config, f, None) for f in _IMAGE_TOKEN_FIELDS}
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def image_token_counts(model_or_config, processor,
                       image_sizes: list[tuple[int, int]]) -> list[int] | None:  # fmt: skip
    """Image tokens of an image of each ``image_sizes[i] = (height, width)``, from the
    processor's own formula (its ``_get_num_multimodal_tokens``), no pixels processed. None
    where the processor cannot count from the size (no such method; Gemma 3 with pan-and-scan
    crops, which depend on the pixels) and for text-only families."""
    if not get_adapter(model_or_config).vlm:
        return None
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    image_processor = getattr(processor, "image_processor", None)
    if count is None or getattr(image_processor, "do_pan_and_scan", False):
        return None
    return [int(n) for n in count(image_sizes=[list(s) for s in image_sizes])["num_image_tokens"]]


def expanded_prompts(model_or_config, processor, texts: list[str],
                     image_sizes: list[tuple[int, int]]) -> list[str] | None:  # fmt: skip
    """Each prompt of a VLM with its image placeholder expanded as the family's processor
    expands it for an image of ``image_sizes[i] = (height, width)``: tokenizing it gives the
    processor's ``input_ids`` without resizing or normalising any pixels. The count of image
    tokens comes from the size alone (:func:`image_token_counts`). None where the processor
    cannot count from the size: then only the processor knows. Text-only families: the texts
    as given.
    """
    adapter = get_adapter(model_or_config)
    if not adapter.vlm:
        return list(texts)
    token = getattr(processor, "image_token", None)
    counts = image_token_counts(model_or_config, processor, image_sizes)
    if counts is None or token is None:
        return None
    if adapter.image_text == "sequence":
        return [t.replace(token, processor.full_image_sequence) for t in texts]
    return [t.replace(token, token * n) for t, n in zip(texts, counts, strict=True)]


def fingerprint(model: nn.Module) -> Fingerprint:
    """What identifies this model: family, L, N, activation, hidden size, config hash, and the
    weights (:func:`weights_hash`), so that a fine-tune or another seed of the same
    architecture is another model."""
    adapter = get_adapter(model)
    mlps = decoder_mlps(model)
    tc = text_config(model)
    cfg = {k: v for k, v in tc.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return Fingerprint(
        family=adapter.family,
        model_type=_config(model).model_type,
        num_layers=len(mlps),
        num_neurons=mlps[0].gate_proj.out_features,
        hidden_size=mlps[0].gate_proj.in_features,
        act_fn=activation_fn(model),
        config_hash=digest[:16],
        weights_hash=weights_hash(model),
    )


# Values hashed per tensor: every one of a small tensor, an evenly strided sample of a large
# one. Fine-tuning or another seed moves (nearly) every weight, so 4096 samples per tensor see
# it; ~730 tensors of a 7B VLM give 3M bf16 values (6 MB) to hash, milliseconds.
WEIGHT_SAMPLES = 4096


def weights_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's weights: for every state-dict tensor in name
    order, its name, shape and a fixed strided sample of its values rounded to bfloat16.

    The sample is gathered on the tensor's own device and copied to the host once per device
    (never the weights themselves). Rounding to bf16 makes one checkpoint hash the same loaded
    in float32 or bfloat16 (bf16 of a float32 value is what loading in bf16 keeps); float16
    may differ (its narrower exponent range changes the smallest weights). A tensor left on
    the ``meta`` device (offloaded by accelerate) counts by name and shape only.
    """
    state = sorted(model.state_dict().items())
    samples: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in state:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        if flat.numel() > WEIGHT_SAMPLES:
            idx = torch.arange(WEIGHT_SAMPLES, device=flat.device) * flat.numel() // WEIGHT_SAMPLES
            flat = flat[idx]
        samples.setdefault(flat.device, []).append(flat.to(torch.bfloat16))
    # One host copy per device, then back into name order: the same hash however the model
    # is spread over devices.
    host = {dev: iter(torch.cat(ts).view(torch.int16).cpu().split([x.numel() for x in ts]))
            for dev, ts in samples.items()}  # fmt: skip
    h = hashlib.sha256()
    for name, t in state:
        h.update(f"{name}{list(t.shape)};".encode())
        if t.device.type != "meta" and t.numel():
            h.update(next(host[t.device]).numpy().tobytes())
    return h.hexdigest()[:16]


# Keys that change with how a model was saved or loaded, not with which neurons it has.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
    "_attn_implementation", "_attn_implementation_autoset", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "_commit_hash", "quantization_config",
}  # fmt: skip
