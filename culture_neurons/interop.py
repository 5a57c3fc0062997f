"""Use culture-neurons from other interpretability libraries, and export masks to their formats.

Symbols: C cultures, L layers, N neurons per layer, S mask sets; a neuron (l, n) is coordinate n
of ``a = act_fn(gate_proj(x))`` in decoder layer l (SPEC "Definitions").

nnsight (no patching: nnsight's own module access plus :mod:`culture_neurons.functional`)::

    lm = nnsight.NNsight(model)                     # or nnsight.LanguageModel(model, tokenizer=tok)
    stats = Stats.zeros(cultures, adapters.fingerprint(model))
    with lm.trace(**batch):
        record_in_trace(lm, stats, culture=item_culture, weights=batch["attention_mask"])
    with lm.trace(**batch):
        record_in_trace(lm, masks=masks, set_ids=item_set)   # ablate, no recording
        logits = lm.output.logits.save()

The other way also works: attach an :class:`~culture_neurons.instrument.Instrument` to the HF
model (``hf_model(lm)``) and call ``set_batch`` before each trace; see :func:`instrument`.

Exports of one mask set (``culture``: a set name or index):

- TransformerLens: :func:`to_transformer_lens` -> ``[(hook_name, neuron indices)]`` on
  ``blocks.{l}.mlp.hook_post`` and :func:`transformer_lens_hooks` -> ``fwd_hooks`` for
  ``model.run_with_hooks``; :func:`transformer_lens_record_hooks` records statistics there.
- pyvene: :func:`to_pyvene` -> a JSON-serialisable intervention config on ``mlp_activation``.
- LAPE (Tang et al. 2024): :func:`to_lape` / :func:`from_lape` (the ``Masks`` methods).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import adapters
from . import functional as F
from .errors import UsageError
from .masks import Masks
from .stats import Fingerprint, Stats

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


# --- nnsight -----------------------------------------------------------------------------------


def hf_model(model) -> nn.Module:
    """The torch model inside an nnsight wrapper (``NNsight``, ``LanguageModel``,
    ``TransformersModel``: an Envoy), or ``model`` itself when it is a plain ``nn.Module``."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "_module", None)  # nnsight's Envoy keeps the wrapped module here
    if isinstance(inner, nn.Module):
        return inner
    raise UsageError(
        f"expected an HF model or an nnsight wrapper of one, got {type(model).__name__}; wrap "
        "the model with nnsight.NNsight(model) or nnsight.LanguageModel(model, tokenizer=...)"
    )


def mlp_paths(model) -> list[str]:
    """Dotted module path of each decoder MLP, in layer order (e.g. ``model.layers.3.mlp``).

    Found by identity from :func:`culture_neurons.adapters.decoder_mlps`, so the adapters stay
    the one place that knows where the language model's MLPs are (never the vision tower's).
    """
    hf = hf_model(model)
    names = {id(m): name for name, m in hf.named_modules()}
    return [names[id(mlp)] for mlp in adapters.decoder_mlps(hf)]


def record_in_trace(
    model,
    stats: Stats | None = None,
    culture: torch.Tensor | int | None = None,
    weights: torch.Tensor | None = None,
    *,
    masks: Masks | None = None,
    set_ids: torch.Tensor | int | None = None,
    count: bool = True,
) -> None:
    """Record and/or ablate every decoder MLP of ``model``; call INSIDE ``model.trace(...)``.

    Uses nnsight's own access to each layer's ``mlp.act_fn.output`` (``a`` of
    ``activation="gate"``) and ``mlp.down_proj.input`` (``activation="post"``); nothing is
    patched. With ``masks``, each row's set's neurons are zeroed in ``act_fn.output`` (so
    ``h = a * up`` is zero there) and the statistics see the ablated values, as with the
    Instrument. Layers are visited in forward order, as nnsight requires.

    Args:
        model: ``nnsight.NNsight`` (or ``LanguageModel`` / ``TransformersModel``) over a
            supported HF model.
        stats: where to add T, K, S, Q (and items); None = no recording.
        culture: ``[B]`` per item or ``[B, T]`` per token; -1 = not counted.
        weights: ``[B, T]`` 0/1 token weights, e.g. the batch's ``attention_mask`` (padding
            is then not counted; ``tokens.token_weights`` builds the other scopes). None = all.
        masks, set_ids: ablate ``set_ids`` (``[B]`` or ``[B, T]``, -1 = none) rows' sets.
        count: add the forward's tokens to ``T`` (and, with ``culture`` per item ``[B]``, its
            items to ``items``); set False when several traces share one forward's count.

    Inside ``tracer.invoke(...)`` blocks nnsight shows each invoke only its own rows: call this
    once per invoke with that invoke's ids and weights.

    Raises:
        UsageError: nothing to do, bad ids / shapes (see :mod:`culture_neurons.functional`), or
            an Instrument with the ``fused`` backend attached to the same model (its fused op
            never calls ``act_fn``, so nnsight would never see ``act_fn.output``).
    """
    if stats is None and masks is None:
        raise UsageError("record_in_trace: give stats (to record), masks (to ablate), or both")
    if stats is not None and culture is None:
        raise UsageError("record_in_trace: stats given without culture ids; pass culture")
    if (masks is None) != (set_ids is None):
        raise UsageError("record_in_trace: masks and set_ids go together; pass both or neither")
    _refuse_fused(model)
    lead = None
    for layer, path in enumerate(mlp_paths(model)):
        mlp = model.get(path)
        a = mlp.act_fn.output
        lead = a.shape[:-1]
        if masks is not None:
            a = F.ablate(a, masks, layer, set_ids)
            mlp.act_fn.output = a
        if stats is None:
            continue
        if stats.activation == "post":
            a = mlp.down_proj.input
        F.accumulate(stats, layer, a, culture, weights)
    if stats is not None and count:
        _count(stats, culture, weights, lead)


def _refuse_fused(model) -> None:
    """UsageError if a fused-backend Instrument is attached: its MLP forward never calls
    ``act_fn``, so nnsight would report the layer's ``act_fn.output`` as never reached."""
    for layer, mlp in enumerate(adapters.decoder_mlps(hf_model(model))):
        shown = mlp.__dict__.get("extra_repr")  # what Instrument sets on what it patched
        if shown is not None and "fused" in shown():
            raise UsageError(
                f"decoder layer {layer}'s MLP carries an Instrument with the fused backend, which "
                "bypasses act_fn; detach it (inst.detach()) before record_in_trace, or use "
                "backend='hooks' if both must run"
            )


def _count(stats: Stats, culture, weights, lead: torch.Size) -> None:
    """T (and, for per-item ids ``[B]``, items) of one forward whose MLP rows are ``lead``."""
    culture = torch.as_tensor(culture)
    F.count_tokens(stats, F.row_ids(culture, lead, weights))
    if culture.dim() == 1 and len(lead) > 1:
        F.count_items(stats, culture)


def instrument(model, cultures: list[str] | None = None, masks: Masks | None = None, **kwargs):
    """An :class:`~culture_neurons.instrument.Instrument` on the HF model inside ``model``.

    Then, per forward: ``inst.set_batch(culture, ablate=..., **inputs)`` and
    ``with model.trace(**inputs): ...``; the numbers equal those without nnsight.
    nnsight reads module outputs through an instance ``forward`` it installs when it wraps the
    model; the ``fused`` backend also replaces each MLP's instance ``forward``. Wrap with
    nnsight FIRST, then attach: the MLP's own ``.output`` and ``act_fn.output`` are then not
    reachable in the trace (the layers' and projections' still are); ``backend="hooks"`` keeps
    every nnsight access working (``act_fn.output`` then shows the value before the
    Instrument's ablation, which its forward hook applies after), at the speed of plain hooks.
    Attaching first and wrapping second also runs, but ``detach()`` then removes nnsight's
    MLP forward too, breaking its later access to the MLPs.
    """
    from .instrument import Instrument

    return Instrument(hf_model(model), cultures, masks, **kwargs)


# --- TransformerLens ---------------------------------------------------------------------------

#: TL's gated MLP: ``hook_pre`` = x @ W_gate, ``hook_pre_linear`` = x @ W_in,
#: ``hook_post`` = act(pre) * pre_linear, the input of W_out (our ``h``).
TL_HOOK = "blocks.{layer}.mlp.hook_post"


def _set_pairs(masks: Masks, culture: str | int) -> list[tuple[int, list[int]]]:
    """[(layer, sorted neuron indices)] of one set, layers with no neuron left out."""
    pairs = masks.pairs(culture)
    out = []
    for layer in torch.unique(pairs[:, 0]).tolist():
        out.append((int(layer), pairs[pairs[:, 0] == layer, 1].tolist()))
    return out


def to_transformer_lens(masks: Masks, culture: str | int) -> list[tuple[str, list[int]]]:
    """``[(hook_name, neuron indices)]`` of set ``culture``, one entry per layer with neurons.

    The hook is ``blocks.{l}.mlp.hook_post``: in TL's ``GatedMLP`` that is
    ``act(x @ W_gate) * (x @ W_in)``, the input of ``W_out``, so zeroing neuron n there removes
    exactly its contribution to the MLP output, as our ablation does (SPEC: ``a := 0`` makes
    ``h = a * up = 0``). ``hook_pre`` would also work for SiLU / GELU-tanh (act(0) = 0) but
    ``hook_post`` says what is meant; ``hook_pre_linear`` (the up projection) would too, but is
    not the neuron's activation. Layer l is TL's block l (the language model's decoder layer
    l; TL holds no vision tower).
    """
    return [(TL_HOOK.format(layer=layer), idx) for layer, idx in _set_pairs(masks, culture)]


def transformer_lens_hooks(
    masks: Masks, culture: str | int
) -> list[tuple[str, Callable[[torch.Tensor, object], torch.Tensor]]]:
    """``fwd_hooks`` zeroing set ``culture``'s neurons, for ``model.run_with_hooks``::

        logits = tl_model.run_with_hooks(tokens, fwd_hooks=transformer_lens_hooks(masks, "ja"))

    Each hook gets ``hook_post`` ``[batch, pos, d_mlp]`` and returns it with the set's neuron
    indices of that layer zeroed at every position (in place, as TL hooks usually do).
    """
    return [(name, _zero_hook(idx)) for name, idx in to_transformer_lens(masks, culture)]


def transformer_lens_record_hooks(
    stats: Stats, culture: torch.Tensor | int, weights: torch.Tensor | None = None
) -> list[tuple[str, Callable[[torch.Tensor, object], None]]]:
    """``fwd_hooks`` adding one forward's K, S, Q of every layer into ``stats``.

    ``activation="gate"`` reads ``blocks.{l}.mlp.hook_pre`` (x @ W_gate; TL has no hook on
    ``act(pre)`` alone in a gated MLP) and applies ``stats.fingerprint.act_fn``;
    ``"post"`` reads ``hook_post``. Tokens are counted apart, once per forward::

        functional.count_tokens(stats, item_culture, attention_mask)
        tl_model.run_with_hooks(tokens, fwd_hooks=transformer_lens_record_hooks(
            stats, item_culture, attention_mask))

    Args:
        culture: ``[batch]`` or ``[batch, pos]`` culture ids, -1 = not counted.
        weights: ``[batch, pos]`` 0/1 token weights (TL pads too: pass its attention mask).
    """
    from .kernels.ops import activation

    gate = stats.activation == "gate"
    hook_name = "blocks.{layer}.mlp.hook_pre" if gate else TL_HOOK
    act_fn = stats.fingerprint.act_fn

    def record(layer: int):
        def hook(value: torch.Tensor, hook=None) -> None:
            a = activation(value.float(), act_fn) if gate else value
            F.accumulate(stats, layer, a, culture, weights)

        return hook

    L = stats.fingerprint.num_layers
    return [(hook_name.format(layer=layer), record(layer)) for layer in range(L)]


def _zero_hook(indices: list[int]) -> Callable[[torch.Tensor, object], torch.Tensor]:
    index = torch.tensor(indices, dtype=torch.long)

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        activation[..., index.to(activation.device)] = 0
        return activation

    return hook


# --- pyvene ------------------------------------------------------------------------------------

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
    for layer, idx in _set_pairs(masks, culture):
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


# --- LAPE (re-exported for discoverability) ----------------------------------------------------


def to_lape(masks: Masks, path: str | os.PathLike) -> Path:
    """Write LAPE's released format (see :meth:`Masks.to_lape`); returns ``path``."""
    return masks.to_lape(path)


def from_lape(
    path: str | os.PathLike, fingerprint: Fingerprint, names: list[str], method: str = "lape"
) -> Masks:
    """Read LAPE's released format for the model ``fingerprint`` (see :meth:`Masks.from_lape`)."""
    return Masks.from_lape(path, fingerprint, names, method)
