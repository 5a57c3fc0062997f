"""pyvene: a mask set as a JSON-serialisable intervention config, and that config in pyvene."""

from __future__ import annotations

import json
from dataclasses import asdict

from culture_neurons.errors import UsageError
from culture_neurons.interop.sets import set_pairs
from culture_neurons.masks import Masks

__all__ = ["PYVENE_COMPONENT", "PYVENE_INTERVENTION", "pyvene_config", "to_pyvene"]

#: pyvene's component for ``act_fn``'s output in Llama/Mistral/Qwen2/Gemma (``mlp.act_fn``).
PYVENE_COMPONENT = "mlp_activation"
#: pyvene's class that sets the selected subspace (our neuron indices) to zero.
PYVENE_INTERVENTION = "ZeroIntervention"


def to_pyvene(masks: Masks, culture: str | int) -> dict:
    """A JSON-serialisable pyvene intervention config zeroing set ``culture``'s neurons.

    ``{"representations": [{"layer": l, "component": "mlp_activation", "unit": "pos",
    "max_number_of_units": 1, "intervention_type": "ZeroIntervention"}, ...],
    "subspaces": [[n, ...], ...], "set": name, "model": fingerprint}``: one representation per
    layer with neurons, ``subspaces[i]`` the neuron indices of representation i.
    ``mlp_activation`` is pyvene's name for ``mlp.act_fn``'s output, ``a = act(gate_proj(x))``:
    zeroing a there zeroes ``h`` too (SPEC ablation). ``intervention_type`` is a class name;
    :func:`pyvene_config` turns the dict into a ``pyvene.IntervenableConfig``. The subspaces go
    to pyvene at call time (``subspaces=`` of ``IntervenableModel.forward``), once per
    representation and batch row, with ``unit_locations`` naming the positions to ablate.
    """
    name = masks.names[masks.set_index(culture)]
    reps, subspaces = [], []
    for layer, idx in set_pairs(masks, culture):
        reps.append({
            "layer": layer,
            "component": PYVENE_COMPONENT,
            "unit": "pos",
            "max_number_of_units": 1,
            "intervention_type": PYVENE_INTERVENTION,
        })  # fmt: skip
        subspaces.append(idx)
    return {
        "representations": reps,
        "subspaces": subspaces,
        "set": name,
        "method": masks.method,
        "model": asdict(masks.fingerprint),
    }


def pyvene_config(exported: dict | str):
    """``pyvene.IntervenableConfig`` of a :func:`to_pyvene` dict (or its JSON text).

    Raises:
        UsageError: pyvene is not installed (``pip install pyvene``) or the dict is not one
            written by :func:`to_pyvene`.
    """
    try:
        import pyvene as pv
    except ImportError as exc:
        raise UsageError(f"pyvene_config needs pyvene ({exc}); pip install pyvene") from None
    if isinstance(exported, str):
        exported = json.loads(exported)
    try:
        reps = [
            pv.RepresentationConfig(
                **{**r, "intervention_type": getattr(pv, r["intervention_type"])}
            )
            for r in exported["representations"]
        ]
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"not a to_pyvene() config ({exc!r}); export it with to_pyvene") from exc
    return pv.IntervenableConfig(representations=reps)
