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
``act_fn`` finds ``a`` and a tensor hook reduces ``a * grad`` over tokens as the gradient
arrives, layer by layer, into ``[B, N]`` per layer. Items are batch rows, and rows of a batch do
not interact, so one backward of ``q_k.sum()`` gives every row's gradient at once.

Memory (what bounds the estimate at 7B width): each decoder layer runs under activation
checkpointing, so the forward keeps only every layer's input ``[B, T, H]``; a layer's
internals (``a``, the gate, up and attention tensors) exist only while its own backward runs,
recomputed from that input, and ``a`` is taken from the recompute. The peak above the weights
is therefore about ``B * T * (2 L H + 8 N + 12 H)`` activation elements (:func:`estimate_bytes`
states the bound, docs/scale.md how the batch follows from it), not the ``~4 B T L N`` that
autograd would keep for every layer at once. The reduction
works in chunks of at most :data:`CHUNK_ELEMENTS`. ``checkpoint=False`` keeps every layer's
graph (faster: one forward per backward fewer; for small models).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from culture_neurons.errors import UnsupportedModelError, UsageError
from culture_neurons.instrument.instrument import refuse_live_instrument
from culture_neurons.models import adapters

# Elements per chunk of the token reduction: bounds the fp32 ``a * grad`` temporary (64 MiB),
# whatever the rows, tokens and width (4 items x 4,000 image tokens x 18,944 neurons is 1.2 GB).
CHUNK_ELEMENTS = 1 << 24


def attribute(
    model: nn.Module,
    inputs: dict,
    quantities: Callable[[object], torch.Tensor],
    weights: torch.Tensor | None = None,
    checkpoint: bool = True,
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
        checkpoint: recompute each decoder layer in its backward instead of keeping its
            internals (see the module docstring); the result is the same.

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
    state = _State(len(mlps), weights, keep=not checkpoint)
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = [lm.register_forward_pre_hook(_embeds_leaf, with_kwargs=True)]
    handles += [adapters.act_module(m).register_forward_hook(state.act_hook(l))
                for l, m in enumerate(mlps)]  # fmt: skip
    layers = adapters.get_adapter(model).decoder_layers(model) if checkpoint else []
    # A forward set on the instance (accelerate's device-map hooks do so) is restored as it was.
    shadowed = [layer.__dict__.get("forward") for layer in layers]
    model.requires_grad_(False)
    try:
        for layer in layers:
            layer.forward = _checkpointed(layer.forward)
        with torch.enable_grad():
            # No cache: a recomputed layer would append its keys to it a second time.
            q = quantities(model(**{**inputs, "use_cache": False}))
            state.forwarding = False
            if q.dim() != 2 or q.shape[0] != state.batch:
                raise UsageError(f"quantities must return [B, Q] = [{state.batch}, Q] scores, "
                                 f"got {list(q.shape)}")  # fmt: skip
            out = []
            for k in range(q.shape[1]):
                state.begin()
                q[:, k].sum().backward(retain_graph=k + 1 < q.shape[1])
                out.append(state.result())
    finally:
        for layer, forward in zip(layers, shadowed, strict=True):
            if forward is None:
                layer.__dict__.pop("forward", None)  # the class's forward again
            else:
                layer.forward = forward
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        state.release()
    return q.detach().float(), torch.stack(out)


# The estimate's peak above the weights, per prompt token, in activation elements (measured
# with bench/bench_width.py and tests/instrument/test_attribution_memory.py, then rounded up):
# one layer's recompute with its gradients (~6 N + 10 H) and every layer's kept input (~1.4 H).
PER_TOKEN_N, PER_TOKEN_H, PER_TOKEN_LAYER_H = 8, 12, 2
# Attention masks: about one fp32 per (token, token) pair of an item; a quantity over every
# position's logits (the LM task's NLL) holds ~3 fp32 per (token, vocabulary entry).
MASK_BYTES, ALL_LOGITS_BYTES = 4, 16


def estimate_bytes(model: nn.Module, items: int, tokens: int, all_logits: bool = False) -> int:
    """The stated bound on :func:`attribute`'s peak memory above the weights (bytes) for
    ``items`` prompts of ``tokens`` tokens (checkpointing on): the per-token terms above at the
    model's activation dtype, the reduction's fp32 chunks and the ``[Q, B, L, N]`` result (Q at
    most 3, the multiple-choice margins). ``all_logits``: the quantities read every position's
    logits (the LM task's NLL)."""
    tc = adapters.text_config(model)
    L, N, H = tc.num_hidden_layers, tc.intermediate_size, tc.hidden_size
    element = next(model.parameters()).element_size()
    per_token = (element * (PER_TOKEN_N * N + (PER_TOKEN_H + PER_TOKEN_LAYER_H * L) * H)
                 + MASK_BYTES * tokens + (ALL_LOGITS_BYTES * tc.vocab_size if all_logits else 0))
    return items * tokens * per_token + 2 * CHUNK_ELEMENTS * 4 + 3 * items * L * N * 4


def items_within(model: nn.Module, bound_bytes: float, tokens: int, most: int,
                 all_logits: bool = False) -> int:  # fmt: skip
    """The most items (at least 1, at most ``most``) of ``tokens`` tokens whose estimate stays
    within ``bound_bytes`` (:func:`estimate_bytes`)."""
    fits = 1
    while fits < most and estimate_bytes(model, fits + 1, tokens, all_logits=all_logits) \
            <= bound_bytes:  # fmt: skip
        fits += 1
    return fits


def _checkpointed(forward):
    """``forward`` run under non-reentrant activation checkpointing (an instance attribute
    shadowing the class's forward; hooks on the layer still run)."""

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


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
    """Each layer's activation while its gradient is due, and per backward each layer's
    reduced A. The forward registers a gradient hook on every ``a``; ``keep``: it also keeps
    ``a``, else (checkpointing) ``a`` is taken from the layer's recompute in the backward, which
    runs before the layer's gradients do."""

    def __init__(self, layers: int, weights: torch.Tensor | None, keep: bool):
        self.weights, self.keep = weights, keep
        self.forwarding = True
        self.acts: list[torch.Tensor | None] = [None] * layers
        self.sums: list[torch.Tensor | None] = [None] * layers
        self.batch = None if weights is None else weights.shape[0]

    def act_hook(self, layer: int):
        def hook(module, args, a):
            if not self.forwarding:  # a checkpointed layer's recompute
                self.acts[layer] = a.detach()
            elif a.requires_grad:
                self.batch = a.shape[0]
                a.register_hook(self.grad_hook(layer))
                if self.keep:
                    self.acts[layer] = a
            return None

        return hook

    def grad_hook(self, layer: int):
        def hook(grad: torch.Tensor):
            self.sums[layer] = _reduce(self.acts[layer], grad, self.weights)
            if not self.keep:
                self.acts[layer] = None  # recomputed again by the next backward
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
    """``[B, N]`` float32: sum over tokens of ``w * a * grad`` (a [B, T, N]), in chunks of rows
    and tokens of at most :data:`CHUNK_ELEMENTS` each."""
    a, grad = a.detach(), grad.detach()
    B, T, N = a.shape
    rows_per = max(1, CHUNK_ELEMENTS // (T * N))
    tokens_per = max(1, CHUNK_ELEMENTS // N) if rows_per == 1 else T
    out = torch.zeros(B, N, dtype=torch.float32, device=a.device)
    for start in range(0, B, rows_per):
        rows = slice(start, start + rows_per)
        for t0 in range(0, T, tokens_per):
            tokens = slice(t0, t0 + tokens_per)
            prod = a[rows, tokens].float() * grad[rows, tokens].float()  # [b, t, N]
            if weights is not None:
                # where, not a product: a padded position's gradient may be NaN (a fully
                # masked attention row), and NaN * 0 is NaN.
                keep = weights[rows, tokens].to(prod.device).bool()[..., None]
                prod = torch.where(keep, prod, 0.0)
            out[rows] += prod.sum(dim=1)
    return out
