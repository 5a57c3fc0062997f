"""Use culture-neurons from other interpretability libraries, and export masks to their formats.

Symbols: C cultures, L layers, N neurons per layer, S mask sets; a neuron (l, n) is coordinate n
of ``a = act_fn(gate_proj(x))`` in decoder layer l (SPEC "Definitions").

- nnsight (:mod:`.nnsight`): :func:`record_in_trace` inside ``model.trace(...)``, or an
  :func:`instrument` on the model inside the wrapper.
- TransformerLens (:mod:`.transformer_lens`): :func:`to_transformer_lens` ->
  ``[(hook_name, neuron indices)]`` on ``blocks.{l}.mlp.hook_post``,
  :func:`transformer_lens_hooks` -> ``fwd_hooks`` for ``model.run_with_hooks``, and
  :func:`transformer_lens_record_hooks` to record statistics there.
- pyvene (:mod:`.pyvene`): :func:`to_pyvene` -> a JSON-serialisable intervention config on
  ``mlp_activation``; :func:`pyvene_config` turns it into pyvene's own.
- LAPE (Tang et al. 2024): :func:`to_lape` / :func:`from_lape` (the ``Masks`` methods).
"""

from __future__ import annotations

import os
from pathlib import Path

from culture_neurons.interop.nnsight import hf_model, instrument, mlp_paths, record_in_trace
from culture_neurons.interop.pyvene import (
    PYVENE_COMPONENT,
    PYVENE_INTERVENTION,
    pyvene_config,
    to_pyvene,
)
from culture_neurons.interop.transformer_lens import (
    TL_HOOK,
    to_transformer_lens,
    transformer_lens_hooks,
    transformer_lens_record_hooks,
)
from culture_neurons.masks import Masks
from culture_neurons.stats import Fingerprint

__all__ = [
    "PYVENE_COMPONENT",
    "PYVENE_INTERVENTION",
    "TL_HOOK",
    "from_lape",
    "hf_model",
    "instrument",
    "mlp_paths",
    "pyvene_config",
    "record_in_trace",
    "to_lape",
    "to_pyvene",
    "to_transformer_lens",
    "transformer_lens_hooks",
    "transformer_lens_record_hooks",
]


def to_lape(masks: Masks, path: str | os.PathLike) -> Path:
    """Write LAPE's released format (see :meth:`Masks.to_lape`); returns ``path``."""
    return masks.to_lape(path)


def from_lape(
    path: str | os.PathLike, fingerprint: Fingerprint, names: list[str], method: str = "lape"
) -> Masks:
    """Read LAPE's released format for the model ``fingerprint`` (see :meth:`Masks.from_lape`)."""
    return Masks.from_lape(path, fingerprint, names, method)
