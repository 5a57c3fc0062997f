"""The reference backend: plain PyTorch forward hooks, what most people write by hand.

A forward hook on each MLP's ``act_fn`` sees ``a = act(gate_proj(x))`` ``[B, T, N]``; it
zeroes the ablated neurons of each row (SPEC: ``a := 0``, so ``h = a * up`` is zero too) and
adds the gate statistics. With ``activation="post"`` a pre-hook on ``down_proj`` records its
input ``h = a * up``. Sums are taken in fp64 here: this backend is the yardstick.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError


def accumulate(site, a: torch.Tensor, culture: torch.Tensor) -> None:
    """``K/S/Q[c, n] += sum over rows r of culture c`` of ``[a > 0]``, ``a``, ``a^2``."""
    a = a.reshape(culture.shape[0], -1)
    counted = culture >= 0
    c = culture[counted].long()
    x = a[counted].double()
    site.K.index_add_(0, c, (x > 0).long())
    site.S.index_add_(0, c, x)
    site.Q.index_add_(0, c, x * x)


def ablated(site, a: torch.Tensor, set_ids: torch.Tensor) -> torch.Tensor:
    """``a`` with each row multiplied by the keep-mask of its set (set -1: all ones)."""
    keep = site.keep[set_ids.long()].to(a.dtype)  # [B*T, N]
    return a * keep.view(a.shape)


class HooksHandle:
    def __init__(self, inst):
        acts = [site.mlp.act_fn for site in inst.sites]
        if len({id(a) for a in acts}) != len(acts):
            raise UnsupportedModelError(
                "the decoder MLPs share one act_fn module, so hooks cannot tell layers apart; "
                "use backend='fused'"
            )
        self.handles = []
        for site in inst.sites:
            self.handles.append(site.mlp.act_fn.register_forward_hook(self._act_hook(inst, site)))
            if inst.recording and inst.activation == "post":
                hook = self._down_pre_hook(site)
                self.handles.append(site.mlp.down_proj.register_forward_pre_hook(hook))

    @staticmethod
    def _act_hook(inst, site):
        def hook(module, args, a):
            culture, set_ids = site.begin(a)
            if set_ids is not None:
                a = ablated(site, a, set_ids)
            if culture is not None and inst.activation == "gate":
                accumulate(site, a, culture)
            return a

        return hook

    @staticmethod
    def _down_pre_hook(site):
        def hook(module, args):
            culture, _ = site.current
            if culture is not None:
                accumulate(site, args[0], culture)

        return hook

    def flush(self) -> None:
        """Hooks add straight into the fp64 accumulators: nothing is pending."""

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(inst) -> HooksHandle:
    return HooksHandle(inst)
