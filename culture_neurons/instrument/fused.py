"""The fused backend: each decoder MLP's ``forward`` is replaced on the instance.

    h = act_and_record(gate_proj(x), up_proj(x))   # one op: act, ablation mask, K/S/Q
    y = down_proj(h)

On CUDA the op is one Triton kernel (the activations are never written out for the
statistics) that adds straight into the layer's int64 / fp64 totals (or, for a staged batch,
into per-item slots: the same kernel with item slots as its "cultures"); elsewhere the same math
runs in PyTorch over token chunks (:mod:`culture_neurons.kernels.reduce`). No per-forward
work besides the op: nothing to fold, zero or synchronise. Each layer's op is bound once, at
attach (:class:`culture_neurons.kernels.ops.LayerOp`: totals, keep mask, activation and factor
checked there), so a forward checks only its inputs and launches (no custom-op dispatch outside
``torch.compile``, no placeholder tensors).

gate_proj, up_proj and down_proj are still called as modules, so hooks on them keep firing.
A hook on ``act_fn`` could not fire inside the fused op: such a layer takes the eager path
(``act_fn`` called, then the same masking and statistics as the hooks backend) and a warning
says so.
"""

from __future__ import annotations

import logging
import warnings

import torch

from culture_neurons.instrument import hooks
from culture_neurons.kernels.ops import LayerOp
from culture_neurons.models import adapters

log = logging.getLogger(__name__)


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class FusedHandle:
    def __init__(self, inst):
        self.inst = inst
        self.saved = []  # (mlp, instance-level forward it had or None, the one we installed)
        self._warned = False
        self.attached = True
        for site in inst.sites:
            mlp = site.mlp
            ours = self._forward(site)
            self.saved.append((mlp, mlp.__dict__.get("forward"), ours))
            mlp.forward = ours

    def _forward(self, site):
        inst, mlp = self.inst, site.mlp
        op = self._op(site, site.layer_totals or (None, None, None))
        staged = [None, None]  # (slot sums, op bound to them): rebound when the slots grow

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.attached:  # detached while a wrapper (e.g. nnsight) still calls us
                return type(mlp).forward(mlp, x)
            culture, set_ids = site.begin(x)
            g, u = adapters.gate_up(mlp, x)
            if _has_hooks(adapters.act_module(mlp)):
                return adapters.down(mlp, self._eager(site, g, u, culture, set_ids))
            layer_op = op
            if culture is not None and inst._batch.staged is not None:
                if staged[0] is not site.sums:
                    staged[:] = site.sums, self._op(site, site.sums)
                layer_op = staged[1]
            one_culture = inst._batch.one_culture if culture is not None else -1
            return adapters.down(mlp, layer_op(g, u, culture, set_ids, one_culture))

        return forward

    def _op(self, site, sums) -> LayerOp:
        """The layer's op adding into ``sums`` (K, S, Q; None when not recording)."""
        inst = self.inst
        K, S, Q = sums
        return LayerOp(inst.fingerprint.num_neurons, site.device, act_fn=inst.act_fn,
                       activation=inst.activation, factor=inst.factor, K=K, S=S, Q=Q,
                       keep=site.keep)  # fmt: skip

    def _eager(self, site, g, u, culture, set_ids) -> torch.Tensor:
        if not self._warned:
            warnings.warn(
                "a hook is registered on a decoder MLP's act_fn; those layers run the eager "
                "path (act_fn called, statistics in PyTorch) so that the hook keeps firing",
                stacklevel=3,
            )
            self._warned = True
        a = adapters.act_module(site.mlp)(g)
        if set_ids is not None:
            a = hooks.ablated(site, a, set_ids)
        h = a * u
        if culture is not None:
            hooks.record(site, a if self.inst.activation == "gate" else h, culture)
        return h

    def detach(self) -> None:
        self.attached = False
        for mlp, forward, ours in self.saved:
            if mlp.__dict__.get("forward") is not ours:
                # Someone wrapped our forward after we attached (nnsight does): leave theirs in
                # place; ours now passes straight through to the class forward.
                log.warning("%s.forward was wrapped after attaching; left in place",
                            type(mlp).__name__)  # fmt: skip
                continue
            del mlp.forward
            if forward is not None:
                mlp.forward = forward
        self.saved.clear()


def attach(inst) -> FusedHandle:
    return FusedHandle(inst)
