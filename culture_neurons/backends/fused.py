"""The fused backend: each decoder MLP's ``forward`` is replaced on the instance.

    h = act_and_record(gate_proj(x), up_proj(x))   # one op: act, ablation mask, K/S/Q
    y = down_proj(h)

On CUDA the op is one Triton kernel (the activations are never written out for the
statistics); elsewhere the same math runs in PyTorch over token chunks. The op adds into
per-layer int32/fp32 working accumulators, which are folded into the int64/fp64 totals after
every forward (so int32 never overflows and long runs keep fp64 accuracy).

gate_proj, up_proj and down_proj are still called as modules, so hooks on them keep firing.
A hook on ``act_fn`` could not fire inside the fused op: such a layer takes the eager path
(``act_fn`` called, then the same masking and statistics in PyTorch) and a warning says so.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ..kernels.ops import act_and_record
from . import hooks

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
        self._alloc_working()

    def _alloc_working(self) -> None:
        if not self.inst.recording:
            return
        C, N = len(self.inst.cultures), self.inst.fingerprint.num_neurons
        for site in self.inst.sites:
            site.K32 = torch.zeros(C, N, dtype=torch.int32, device=site.device)
            site.S32 = torch.zeros(C, N, dtype=torch.float32, device=site.device)
            site.Q32 = torch.zeros(C, N, dtype=torch.float32, device=site.device)

    def _forward(self, site):
        inst, mlp = self.inst, site.mlp

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.attached:  # detached while a wrapper (e.g. nnsight) still calls us
                return type(mlp).forward(mlp, x)
            culture, set_ids = site.begin(x)
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
            if _has_hooks(mlp.act_fn):
                return mlp.down_proj(self._eager(site, g, u, culture, set_ids))
            lead = g.shape[:-1]
            recording = culture is not None
            h = act_and_record(
                g, u,
                act_fn=inst.act_fn,
                record=inst.activation,
                row_culture=culture.view(lead) if recording else None,
                K=site.K32 if recording else None,
                S=site.S32 if recording else None,
                Q=site.Q32 if recording else None,
                keep=site.keep if set_ids is not None else None,
                row_set=set_ids.view(lead) if set_ids is not None else None,
            )  # fmt: skip
            if recording:
                _fold(site)
            return mlp.down_proj(h)

        return forward

    def _eager(self, site, g, u, culture, set_ids) -> torch.Tensor:
        if not self._warned:
            warnings.warn(
                "a hook is registered on a decoder MLP's act_fn; those layers run the eager "
                "path (act_fn called, statistics in PyTorch) so that the hook keeps firing",
                stacklevel=3,
            )
            self._warned = True
        a = site.mlp.act_fn(g)
        if set_ids is not None:
            a = hooks.ablated(site, a, set_ids)
        h = a * u
        if culture is not None:
            hooks.accumulate(site, a if self.inst.activation == "gate" else h, culture)
        return h

    def flush(self) -> None:
        """Working accumulators are folded after every forward: nothing is pending."""

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
        for site in self.inst.sites:
            site.K32 = site.S32 = site.Q32 = None
        self.saved.clear()


def _fold(site) -> None:
    """Add the working int32/fp32 sums of one forward into the int64/fp64 totals, then zero."""
    site.K += site.K32
    site.S += site.S32
    site.Q += site.Q32
    site.K32.zero_()
    site.S32.zero_()
    site.Q32.zero_()


def attach(inst) -> FusedHandle:
    return FusedHandle(inst)
