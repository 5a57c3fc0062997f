"""Load a model and its processor by hub id or local path, with errors that say what to do."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from culture_neurons.errors import UsageError
from culture_neurons.models import adapters

log = logging.getLogger(__name__)
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # the names offered (DTYPES: aliases)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun each rank takes the GPU of its local rank.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but no CUDA GPU is visible; "
                         "use --device cpu (or auto)")  # fmt: skip
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e


def place(model, dtype: str = "auto", device: str = "auto"):
    """An in-memory model (e.g. the embedded toy) where :func:`load_model` would put a loaded
    one: on ``device`` (``map``: the first GPU, or the CPU), in ``dtype`` (``auto``: as it
    is)."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    model = model.to(resolve_device("auto" if device == "map" else device))
    return model if DTYPES[dtype] == "auto" else model.to(DTYPES[dtype])


def load_model(name: str, dtype: str = "auto", device: str = "auto"):
    """(model, processor) in eval mode. VLM families get their processor, text-only families
    their tokenizer. The family is checked from the config before any weight is read.

    ``device="map"`` spreads a model larger than one GPU over all of them (accelerate's
    ``device_map="auto"``); each layer's accumulators then live on that layer's device."""
    import transformers as tf

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    spread = device == "map"
    dev = resolve_device("auto" if spread else device)
    try:
        config = tf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "a local folder without config.json" if Path(name).exists() else "not a local path"
        raise UsageError(
            f"cannot load model {name!r}: {where}, and no hub id of that name could be reached "
            "(offline, or no such model); pass a local folder saved with save_pretrained"
        ) from e
    adapter = adapters.get_adapter(config)  # unsupported families fail here, before weights
    cls = tf.AutoModelForImageTextToText if adapter.vlm else tf.AutoModelForCausalLM
    torch_dtype = DTYPES[dtype]
    if torch_dtype == "auto" and dev.type == "cpu":
        torch_dtype = torch.float32  # bf16 matmuls are slow and inexact on CPUs
    if spread:
        model = cls.from_pretrained(name, dtype=torch_dtype, device_map="auto").eval()
    else:
        model = cls.from_pretrained(name, dtype=torch_dtype).to(dev).eval()
    processor = load_processor(name, adapter)
    log.info("loaded %s (%s) on %s", name, adapter.family, dev)
    return model, processor


class NoVideoProcessorMixin:
    """Lets a processor be built with ``video_processor=None``: transformers' video processors
    need torchvision, which is absent beside CPU-only torch builds; we never pass video."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def no_video(processor_cls: type) -> type:
    """``processor_cls`` accepting ``video_processor=None`` (an instance of it all the same)."""
    return type(processor_cls.__name__, (NoVideoProcessorMixin, processor_cls), {})


def load_processor(name: str, adapter: adapters.Adapter):
    """The processor of a VLM (its tokenizer for text-only models). Where the full processor
    cannot be built (its video processor needs torchvision, or it was saved in parts by
    :func:`save_processor`) it is assembled from the tokenizer and the image processor."""
    import transformers as tf

    if not adapter.vlm:
        return tf.AutoTokenizer.from_pretrained(name)
    try:
        processor = tf.AutoProcessor.from_pretrained(name)
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, OSError, ValueError, TypeError) as e:
        log.info("assembling the processor of %s from parts (%s)", name, e)
    tokenizer = tf.AutoTokenizer.from_pretrained(name)
    image_processor = tf.AutoImageProcessor.from_pretrained(name)
    cls = getattr(tf, adapter.processor)
    extra = {"video_processor": None} if "video_processor" in _init_args(cls) else {}
    return no_video(cls)(image_processor=image_processor, tokenizer=tokenizer,
                         chat_template=tokenizer.chat_template, **extra)  # fmt: skip


def save_processor(processor, path) -> None:
    """Save a processor so that :func:`load_processor` reads it back, also one built without a
    video processor (whose own save_pretrained fails): tokenizer (with the chat template) and
    image processor side by side."""
    if getattr(processor, "video_processor", "absent") is not None:
        processor.save_pretrained(path)
        return
    tokenizer = processor.tokenizer
    tokenizer.chat_template = processor.chat_template
    tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def _init_args(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
