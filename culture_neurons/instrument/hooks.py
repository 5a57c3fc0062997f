"""The reference backend: plain PyTorch forward hooks, what most people write by hand.

A forward hook on each MLP's ``act_fn`` sees ``a = act(gate_proj(x))`` ``[B, T, N]``; it
zeroes the ablated neurons of each row (SPEC: ``a := 0``, so ``h = a * up`` is zero too) and
adds the gate statistics. With ``activation="post"`` a pre-hook on ``down_proj`` records its
input ``h = a * up``. Both go through :mod:`culture_neurons.kernels.reduce` (row chunks,
fp32 within a chunk, int64 / fp64 totals on the layer's device), so this backend fits a 7B
model on one GPU and agrees with the fused backend's PyTorch path by construction.
"""

from __future__ import annotations

from culture_neurons.errors import UnsupportedModelError
from culture_neurons.kernels import reduce
from culture_neurons.models import adapters


def record(site, a, culture) -> None:
    """Add the statistics of one layer's recorded activation ``a [..., N]`` where the forward
    adds (``site.sums``: its totals, or the staging slots of a staged batch)."""
    site.sums.add(a, culture)


def ablated(site, a, set_ids):
    """``a`` with each row's set's neurons zeroed (or steered): in place where autograd allows."""
    rows = a.reshape(-1, a.shape[-1])
    factor = site.inst.factor
    if a.requires_grad and a.grad_fn is not None:
        return reduce.ablate(rows, site.keep, set_ids, factor).view(a.shape)
    reduce.ablate_(rows, site.keep, set_ids, factor)
    return a


class HooksHandle:
    def __init__(self, inst):
        acts = [adapters.act_module(site.mlp) for site in inst.sites]
        if len({id(a) for a in acts}) != len(acts):
            raise UnsupportedModelError(
                "the decoder MLPs share one activation module, so hooks cannot tell layers "
                "apart; use backend='fused'"
            )
        self.handles = []
        for site, act in zip(inst.sites, acts, strict=True):
            self.handles.append(act.register_forward_hook(self._act_hook(inst, site)))
            if inst.recording and inst.activation == "post":
                hook = self._down_pre_hook(site)
                down = adapters.down_module(site.mlp)
                self.handles.append(down.register_forward_pre_hook(hook))

    @staticmethod
    def _act_hook(inst, site):
        def hook(module, args, a):
            culture, set_ids = site.begin(a)
            if set_ids is not None:
                a = ablated(site, a, set_ids)
            if culture is not None and inst.activation == "gate":
                record(site, a, culture)
            return a

        return hook

    @staticmethod
    def _down_pre_hook(site):
        def hook(module, args):
            culture, _ = site.current
            if culture is not None:
                record(site, args[0], culture)

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(inst) -> HooksHandle:
    return HooksHandle(inst)
