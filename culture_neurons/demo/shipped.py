"""The toy as shipped: its files inside the package and the content hashes that identify it.

``python -m culture_neurons.demo.build`` trains the toy once and writes :data:`SHIPPED`
(``model/``: safetensors weights with the processor beside them, ``data.parquet``, ``toy.json``
with the hashes below, ``headline.json``: the default run's headline numbers). ``setup.py``
installs the folder as package data, so every machine loads the same weights and items and no
machine trains. Where the binary files are missing (a checkout without them) the toy is
rebuilt into the cache and must hash as ``toy.json`` says; training is deterministic on one
processor, but float results may differ between processors, hence :class:`ToyMismatchError`.

The hashes are of contents, not files: the weights' exact float bits (every state-dict tensor
and the tokenizer's vocabulary) and the items' fields and pixels, so another version of
safetensors, pyarrow or Pillow writing the same toy gives the same hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from culture_neurons.errors import DataError

SHIPPED = Path(__file__).with_name("toy")  # the shipped toy of seed SHIPPED_SEED
SHIPPED_SEED = 0
FILES = ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "data.parquet")


class ToyMismatchError(DataError):
    """The toy's weights or items are not the ones recorded in ``toy.json``."""


def shipped_files_present(folder: Path = SHIPPED) -> bool:
    """Whether ``folder`` holds a complete shipped toy (``toy.json`` and its binary files)."""
    return (folder / "toy.json").is_file() and all((folder / f).is_file() for f in FILES)


def recorded_hashes(folder: Path = SHIPPED) -> dict | None:
    """The content hashes ``toy.json`` of ``folder`` records, or None (no toy.json there)."""
    meta = folder / "toy.json"
    return json.loads(meta.read_text()).get("hashes") if meta.is_file() else None


def content_hashes(model, processor, data) -> dict[str, str]:
    """sha256 of the weights (every tensor's name, dtype, shape and bits, in name order, and
    the tokenizer's vocabulary) and of the items (fields and decoded pixels, in data order)."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        weights.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        weights.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    vocab = sorted(processor.tokenizer.get_vocab().items())
    weights.update(json.dumps(vocab, ensure_ascii=False).encode())
    items = hashlib.sha256()
    for item in data:
        items.update(repr(item).encode())
        items.update(np.asarray(item.image.convert("RGB")).tobytes())
    return {"weights": weights.hexdigest(), "data": items.hexdigest()}


def check_hashes(found: dict[str, str], expected: dict[str, str], where: Path,
                 rebuilt: bool) -> None:  # fmt: skip
    """Raise :class:`ToyMismatchError` naming what differs from ``expected``, and what to do."""
    differ = [k for k in expected if found.get(k) != expected[k]]
    if not differ:
        return
    what = " and ".join(differ)
    if rebuilt:
        raise ToyMismatchError(
            f"the toy rebuilt in {where} differs from the shipped one in its {what} (sha256 "
            f"{', '.join(found[k][:12] for k in differ)} instead of "
            f"{', '.join(expected[k][:12] for k in differ)}). Training is deterministic on one "
            "processor, but float results differ between processors and library versions, so "
            "this machine's toy is another model and its numbers would not match anyone "
            "else's. Install the package with its toy files (pip install . from a checkout "
            f"that has {SHIPPED}/model and data.parquet), or, to use this machine's toy "
            f"anyway, run with --model {where / 'model'} --data {where / 'data.parquet'} and "
            "the toy's --ratio and --batch-size (TOY_RATIO, TOY_BATCH_SIZE in "
            "culture_neurons/demo/toy.py)."
        )
    raise ToyMismatchError(
        f"the toy files in {where} do not match their recorded {what} hash (damaged or "
        "partly replaced): reinstall the package (pip install --force-reinstall .) or restore "
        f"the folder from the repository (git checkout -- {where})"
    )
