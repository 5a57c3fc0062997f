"""nnsight: record and ablate inside ``model.trace(...)``, or attach an Instrument to the model
inside an nnsight wrapper.

    lm = nnsight.NNsight(model)                     # or nnsight.LanguageModel(model, tokenizer=tok)
    totals = Totals(cultures, models.fingerprint(model))
    with lm.trace(**batch):
        record_in_trace(lm, totals, culture=item_culture, weights=batch["attention_mask"])
    with lm.trace(**batch):
        record_in_trace(lm, masks=masks, set_ids=item_set)   # ablate, no recording
        logits = lm.output.logits.save()
    stats = totals.stats()                          # the one copy to the host

No patching: nnsight's own module access plus :mod:`culture_neurons.instrument.functional`,
so the statistics stay on each layer's device until asked for (see there).
The other way also works: attach an :class:`~culture_neurons.instrument.Instrument` to the HF
model (``hf_model(lm)``) and call ``set_batch`` before each trace; see :func:`instrument`.
"""

from __future__ import annotations

import torch
from torch import nn

from culture_neurons.errors import UsageError
from culture_neurons.instrument import functional as F
from culture_neurons.instrument.instrument import refuse_live_instrument
from culture_neurons.masks import Masks
from culture_neurons.models import adapters

__all__ = ["hf_model", "instrument", "mlp_paths", "record_in_trace"]


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
    totals: F.Target | None = None,
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
    Instrument. Layers are visited in forward order, as nnsight requires. The per-row ids are
    built once per call, on the first layer's device.

    Args:
        model: ``nnsight.NNsight`` (or ``LanguageModel`` / ``TransformersModel``) over a
            supported HF model.
        totals: a :class:`~culture_neurons.instrument.Totals` where T, K, S, Q (and items)
            go, on each layer's device (a Stats works too, at the cost stated in
            :mod:`culture_neurons.instrument.functional`); None = no recording.
        culture: ``[B]`` per item or ``[B, T]`` per token; -1 = not counted.
        weights: ``[B, T]`` 0/1 token weights, e.g. the batch's ``attention_mask`` (padding
            is then not counted; ``rows.token_weights`` builds the other scopes). None = all.
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
    if totals is None and masks is None:
        raise UsageError("record_in_trace: give totals (to record), masks (to ablate), or both")
    if totals is not None and culture is None:
        raise UsageError("record_in_trace: totals given without culture ids; pass culture")
    if (masks is None) != (set_ids is None):
        raise UsageError("record_in_trace: masks and set_ids go together; pass both or neither")
    _refuse_fused(model)
    ids = None
    for layer, path in enumerate(mlp_paths(model)):
        mlp = model.get(path)
        act = adapters.act_module(mlp)  # nnsight's Envoy of the activation module
        a = act.output
        if masks is not None:
            if a.requires_grad and torch.is_grad_enabled():  # autograd needs a's old value
                a = F.ablate(a, masks, layer, set_ids)
                act.output = a
            else:  # in place: no [B, T, N] copy per layer
                F.ablate_(a, masks, layer, set_ids)
        if totals is None:
            continue
        if ids is None:  # once per forward: every layer sees the same [B, T] rows
            ids = F.row_ids(culture, a.shape[:-1], weights, device=a.device)
            if count:
                _count(totals, culture, ids)
        if totals.activation == "post":
            a = adapters.down_module(mlp).input
        F.accumulate(totals, layer, a, ids)


def _refuse_fused(model) -> None:
    """UsageError if a fused-backend Instrument is attached: its MLP forward never calls
    ``act_fn``, so nnsight would report the layer's ``act_fn.output`` as never reached."""
    refuse_live_instrument(adapters.decoder_mlps(hf_model(model)),
                           "its fused backend bypasses the activation nnsight reads",
                           backend="fused", alternative=" before record_in_trace, or use "
                           "backend='hooks' if both must run")  # fmt: skip


def _count(totals: F.Target, culture, ids: torch.Tensor) -> None:
    """T from the forward's per-row ``ids`` and, for per-item culture ids ``[B]``, items."""
    F.count_tokens(totals, ids)
    culture = torch.as_tensor(culture)
    if culture.dim() == 1 and ids.dim() > 1:
        F.count_items(totals, culture)


def instrument(model, cultures: list[str] | None = None, masks: Masks | None = None, **kwargs):
    """An :class:`~culture_neurons.instrument.Instrument` on the HF model inside ``model``.

    Then, per forward: ``inst.set_batch(culture, set_ids=..., **inputs)`` and
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
    from culture_neurons.instrument import Instrument

    return Instrument(hf_model(model), cultures, masks, **kwargs)
