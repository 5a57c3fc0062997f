"""TransformerLens: masks as ``fwd_hooks`` (ablation) and hooks that record statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch

from culture_neurons.instrument import functional as F
from culture_neurons.instrument.rows import on_device
from culture_neurons.interop.sets import set_pairs
from culture_neurons.kernels.ops import act
from culture_neurons.masks import Masks

__all__ = ["TL_HOOK", "to_transformer_lens", "transformer_lens_hooks",
           "transformer_lens_record_hooks"]  # fmt: skip

#: TL's gated MLP: ``hook_pre`` = x @ W_gate, ``hook_pre_linear`` = x @ W_in,
#: ``hook_post`` = act(pre) * pre_linear, the input of W_out (our ``h``).
TL_HOOK = "blocks.{layer}.mlp.hook_post"


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
    return [(TL_HOOK.format(layer=layer), idx) for layer, idx in set_pairs(masks, culture)]


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
    totals: F.Target, culture: torch.Tensor | int, weights: torch.Tensor | None = None
) -> list[tuple[str, Callable[[torch.Tensor, object], None]]]:
    """``fwd_hooks`` adding one forward's K, S, Q of every layer into ``totals``.

    ``activation="gate"`` reads ``blocks.{l}.mlp.hook_pre`` (x @ W_gate; TL has no hook on
    ``act(pre)`` alone in a gated MLP) and applies ``totals.fingerprint.act_fn``;
    ``"post"`` reads ``hook_post``. The statistics stay on each block's device (a
    :class:`~culture_neurons.instrument.Totals`; a Stats works too, at the cost stated in
    :mod:`culture_neurons.instrument.functional`). Tokens are counted apart, once per forward::

        totals = Totals(cultures, fingerprint)
        functional.count_tokens(totals, item_culture, attention_mask)
        tl_model.run_with_hooks(tokens, fwd_hooks=transformer_lens_record_hooks(
            totals, item_culture, attention_mask))
        stats = totals.stats()

    Args:
        culture: ``[batch]`` or ``[batch, pos]`` culture ids, -1 = not counted.
        weights: ``[batch, pos]`` 0/1 token weights (TL pads too: pass its attention mask).
    """
    gate = totals.activation == "gate"
    hook_name = "blocks.{layer}.mlp.hook_pre" if gate else TL_HOOK
    act_fn = totals.fingerprint.act_fn

    def record(layer: int):
        def hook(value: torch.Tensor, hook=None) -> None:
            a = act(value.float(), act_fn) if gate else value
            F.accumulate(totals, layer, a, culture, weights)

        return hook

    L = totals.fingerprint.num_layers
    return [(hook_name.format(layer=layer), record(layer)) for layer in range(L)]


def _zero_hook(indices: list[int]) -> Callable[[torch.Tensor, object], torch.Tensor]:
    index = torch.tensor(indices, dtype=torch.long)
    on = {}  # device -> the indices there, moved once (a blocking copy per call would sync)

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        dev = activation.device
        if dev not in on:
            on[dev] = on_device(index, dev)
        activation[..., on[dev]] = 0
        return activation

    return hook
