"""First-order attribution of every decoder MLP neuron, per item: what the estimate mode needs.

Symbols: B items (batch rows), T tokens, L layers, N neurons, Q scoring quantities.
For a differentiable score ``q[b]`` of item b (a letter-logit margin, a summed NLL) and the
recorded activation ``a = act(gate_proj(x))`` of neuron (l, n) at token t,

    A[k, b, l, n] = sum_t w[b, t] * a[b, t, l, n] * d q_k[b] / d a[b, t, l, n]

with ``w`` the 0/1 token weights (padding 0). Scaling neuron (l, n) of item b by ``1 + alpha``
at every counted position changes ``q_k[b]`` by ``alpha * A[k, b, l, n]`` to first order, so a
set s moves it by ``alpha * sum_{(l, n) in s} A[k, b, l, n]``; ablation is ``alpha = -1``.
One forward and Q backward passes give this for every set of every method and every RND draw.

How: the graph starts at the language model's input embeddings (a leaf made here; no weight
needs a gradient, the vision tower is not differentiated), a forward hook on each decoder MLP's
``act_fn`` keeps ``a`` and a tensor hook reduces ``a * grad`` over tokens as the gradient
arrives, layer by layer, into ``[B, N]`` per layer: nothing per token is kept beyond what
autograd itself holds for the backward. Items are batch rows, and rows of a batch do not
interact, so one backward of ``q_k.sum()`` gives every row's gradient at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from culture_neurons.errors import UnsupportedModelError, UsageError
from culture_neurons.instrument.instrument import refuse_live_instrument
from culture_neurons.models import adapters

# Rows per chunk of the token reduction: bounds the ``a * grad`` temporary to CHUNK_ITEMS x T x N.
CHUNK_ITEMS = 4


def attribute(
    model: nn.Module,
    inputs: dict,
    quantities: Callable[[object], torch.Tensor],
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, A)``: the scoring quantities of one forward and their attribution to every neuron.

    Args:
        model: a HF model of a supported family (eval mode; its weights are not modified and
            no weight gradient is computed).
        inputs: the model's keyword inputs for B items (``input_ids``/``inputs_embeds``,
            ``attention_mask``, pixels...).
        quantities: ``outputs -> [B, Q]`` differentiable scores of each item (e.g. letter-logit
            margins from ``outputs.logits``); column k is attributed by one backward pass.
        weights: ``[B, T]`` 0/1 token weights; default the attention mask (padding is 0).

    Returns:
        ``q`` ``[B, Q]`` float32 (detached) and ``A`` ``[Q, B, L, N]`` float32 on the model's
        first decoder layer's device (see the module docstring).

    Raises:
        UnsupportedModelError: decoder MLPs sharing one ``act_fn`` module (hooks cannot tell
            layers apart).
        UsageError: ``quantities`` returned something that is not ``[B, Q]``.
    """
    mlps = adapters.decoder_mlps(model)
    if len({id(adapters.act_module(m)) for m in mlps}) != len(mlps):
        raise UnsupportedModelError(
            "the decoder MLPs share one activation module, so attribution hooks cannot tell "
            "layers apart"
        )
    # A fused Instrument replaces the forward (its activation module is never called).
    refuse_live_instrument(mlps, "attribution needs the model's own forward")
    lm = adapters.get_adapter(model).language_model(model)
    if weights is None:
        weights = inputs.get("attention_mask")
    state = _State(len(mlps), weights)
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = [lm.register_forward_pre_hook(_embeds_leaf, with_kwargs=True)]
    handles += [adapters.act_module(m).register_forward_hook(state.act_hook(l))
                for l, m in enumerate(mlps)]  # fmt: skip
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            q = quantities(model(**inputs))
            if q.dim() != 2 or q.shape[0] != state.batch:
                raise UsageError(f"quantities must return [B, Q] = [{state.batch}, Q] scores, "
                                 f"got {list(q.shape)}")  # fmt: skip
            out = []
            for k in range(q.shape[1]):
                state.begin()
                q[:, k].sum().backward(retain_graph=k + 1 < q.shape[1])
                out.append(state.result())
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        state.release()
    return q.detach().float(), torch.stack(out)


def _embeds_leaf(module, args, kwargs):
    """Start the graph at the language model's input embeddings (pixels never need a grad)."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        embeds = module.get_input_embeddings()(ids)
        kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = embeds.detach().requires_grad_(True)
    return args, kwargs


class _State:
    """Per forward: each layer's kept activation; per backward: each layer's reduced A."""

    def __init__(self, layers: int, weights: torch.Tensor | None):
        self.weights = weights
        self.acts: list[torch.Tensor | None] = [None] * layers
        self.sums: list[torch.Tensor | None] = [None] * layers
        self.batch = None if weights is None else weights.shape[0]

    def act_hook(self, layer: int):
        def hook(module, args, a):
            if not a.requires_grad:
                return None
            self.acts[layer] = a
            self.batch = a.shape[0]
            a.register_hook(self.grad_hook(layer))
            return None

        return hook

    def grad_hook(self, layer: int):
        def hook(grad: torch.Tensor):
            self.sums[layer] = _reduce(self.acts[layer], grad, self.weights)
            return None

        return hook

    def begin(self) -> None:
        self.sums = [None] * len(self.acts)

    def result(self) -> torch.Tensor:
        """``[B, L, N]``; a layer the quantity does not depend on has A = 0."""
        first = next((s for s in self.sums if s is not None), None)
        if first is None:
            a = self.acts[0]
            return torch.zeros(a.shape[0], len(self.acts), a.shape[-1], device=a.device)
        out = torch.zeros(first.shape[0], len(self.sums), first.shape[1], device=first.device)
        for layer, s in enumerate(self.sums):
            if s is not None:
                out[:, layer] = s.to(out.device)
        return out

    def release(self) -> None:
        self.acts = [None] * len(self.acts)
        self.sums = [None] * len(self.sums)


def _reduce(a: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``[B, N]`` float32: sum over tokens of ``w * a * grad`` (a [B, T, N]), items in chunks."""
    a, grad = a.detach(), grad.detach()
    out = torch.empty(a.shape[0], a.shape[-1], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], CHUNK_ITEMS):
        rows = slice(start, start + CHUNK_ITEMS)
        prod = a[rows].float() * grad[rows].float()  # [b, T, N]
        if weights is not None:
            # where, not a product: a padded position's gradient may be NaN (a fully masked
            # attention row), and NaN * 0 is NaN.
            keep = weights[rows].to(prod.device).bool()[..., None]
            prod = torch.where(keep, prod, 0.0)
        out[rows] = prod.sum(dim=1)
    return out
