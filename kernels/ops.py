"""The fused op's two faces; its parts live beside this file, one concern each.

Symbols: R rows (flattened tokens), N neurons, C cultures, num_sets ablation sets.

``act_and_record``: ``h = act(g) * u`` with per-culture ``K, S, Q`` totals updated in place and
optional per-row ablation or steering (math in ``act_record.py``). The parts:

- ``args``: the arguments record :class:`OpArgs` and the checks of the 2D contract;
- ``torch_path``: the PyTorch path over row chunks (every device but CUDA), through ``reduce``;
- ``dispatch``: which path runs (the Triton kernel on CUDA, self-checked by ``check``);
- ``custom_op``: the op's body on every device and the custom op ``culture_neurons::act_and_record``
  that ``torch.compile`` sees.

The faces:

- :func:`act_and_record`: the checked, general face (any leading dims, optional everything);
- :class:`LayerOp`: one layer's op with its totals, mask and options checked once (per attach),
  so that a forward pays only for what changes per call (the fused backend uses it).

Eagerly both call the chosen path directly; under ``torch.compile`` they go through the custom
op, which runs the same function. This module imports on machines without triton.
"""

from __future__ import annotations

import torch

from culture_neurons.errors import UsageError

from .args import (
    ACT_FNS,
    ACTIVATIONS,
    FLOAT_DTYPES,
    OpArgs,
    check,
    check_act_and_record_args,
    refuse,
)
from .check import self_check
from .custom_op import run, via_op
from .torch_path import act, act_and_record_torch

__all__ = ["ACT_FNS", "ACTIVATIONS", "FLOAT_DTYPES", "LayerOp", "OpArgs", "act", "act_and_record",
           "act_and_record_torch", "check_act_and_record_args", "self_check"]


def act_and_record(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    act_fn: str = "silu",
    activation: str = "gate",
    culture: torch.Tensor | None = None,
    K: torch.Tensor | None = None,
    S: torch.Tensor | None = None,
    Q: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    set_ids: torch.Tensor | None = None,
    factor: float = 0.0,
) -> torch.Tensor:
    """``h = act(gate) * up`` (ablated neurons zeroed), recording per-culture statistics.

    Args:
        gate: ``[..., N]`` ``gate_proj(x)``, fp32/fp16/bf16; the leading dims are the R rows.
        up: ``[..., N]`` ``up_proj(x)``, same shape and dtype as gate.
        act_fn: ``"silu"`` or ``"gelu_tanh"``.
        activation: which tensor is ``a``: ``"gate"`` (``act(gate)``) or ``"post"`` (``h``).
        culture: ``[...]`` (gate's leading dims) int32/int64 culture id per row,
            ``-1`` = row not counted (padding, out of scope). None: record nothing.
        K: ``[C, N]`` int64 contiguous, ``K[c, j] += #rows of c with a[r, j] > 0``.
        S: ``[C, N]`` float64 contiguous, ``S[c, j] += sum of a[r, j]`` over rows of c.
        Q: ``[C, N]`` float64 contiguous, ``Q[c, j] += sum of a[r, j]^2`` over rows of c.
        keep: ``[num_sets, N]`` bool/uint8/float, nonzero = keep, 0 = ablate. None: no ablation.
        set_ids: ``[...]`` int32/int64 ablation set id per row, ``-1`` = no ablation.
        factor: what a row's selected neurons' ``act`` is multiplied by: ``0`` ablates (exactly
            0, SPEC's ``a := 0``), ``1 + alpha`` steers (SPEC's ``a := (1 + alpha) a``).

    Ablated neurons have ``a = 0`` and ``h = 0``; the statistics see the ablated (or steered)
    value. Math in fp32 whatever the input dtype (sums are fp32 within a tile or chunk, then
    added to the fp64 totals); ``h`` is returned in gate's dtype and shape. Every argument is
    checked on every call: a caller that calls once per layer per forward with the same totals
    and mask binds them once in a :class:`LayerOp` instead.

    Returns:
        ``h`` ``[..., N]``, the input of down_proj.

    Raises:
        UsageError: inconsistent shapes, dtypes, devices, layouts or (CPU tensors) ids >= C or
            >= num_sets. On CUDA and under torch.compile such ids are not checked (that would
            read the data: a device sync per call) and the op ignores them.
        KernelError: the Triton kernel is forced (``CULTURE_NEURONS_KERNEL=triton``) and
            unavailable or wrong here (see :mod:`.dispatch`).
    """
    shape = gate.shape
    N = shape[-1]
    gate2, up2 = gate.reshape(-1, N), up.reshape(-1, N)
    R = gate2.shape[0]
    do_record = culture is not None
    if do_record and (K is None or S is None or Q is None):
        raise UsageError("act_and_record: culture given without K, S and Q; "
                         "pass all four to record, or none")
    do_ablate = keep is not None
    if do_ablate != (set_ids is not None):
        raise UsageError("act_and_record: keep and set_ids go together "
                         f"(given keep={keep is not None}, set_ids={set_ids is not None})")
    if do_record and culture.shape != shape[:-1]:
        raise UsageError(f"act_and_record: culture must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(culture.shape)}")
    if do_ablate and set_ids.shape != shape[:-1]:
        raise UsageError(f"act_and_record: set_ids must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(set_ids.shape)}")
    rc = culture.reshape(R) if do_record else None
    rs = set_ids.reshape(R) if do_ablate else None
    args = OpArgs(gate2, up2, rc, K, S, Q, keep, rs, act_fn, activation, do_record, do_ablate,
                  float(factor))  # fmt: skip
    check(args)
    # Value checks read the data: only on CPU (no device sync) and outside torch.compile.
    compiling = torch.compiler.is_compiling()
    check_values = gate.device.type == "cpu" and R > 0 and not compiling
    if do_record and check_values and int(rc.max()) >= K.shape[0]:
        raise UsageError(f"act_and_record: culture id {int(rc.max())} >= C = {K.shape[0]}; "
                         "allocate K, S, Q with one row per culture")
    if do_ablate and check_values and int(rs.max()) >= keep.shape[0]:
        raise UsageError(f"act_and_record: set id {int(rs.max())} >= num_sets = "
                         f"{keep.shape[0]}; pass one keep row per set")
    return (via_op(args) if compiling else run(args)).reshape(shape)


class LayerOp:
    """:func:`act_and_record` bound to one layer: its totals, keep mask and options are checked
    once, here, so that a call checks only what changes per forward (gate, up, the row ids).

    Args:
        N: the layer's neurons.
        device: where its tensors live.
        act_fn, activation, factor: as in :func:`act_and_record`.
        K, S, Q: ``[C, N]`` int64 / float64 / float64 contiguous totals on ``device``, updated
            in place by every recording call (None: this op never records).
        keep: ``[num_sets, N]`` keep mask on ``device`` (None: this op never ablates).

    Call: ``op(gate, up, culture=None, set_ids=None, one_culture=-1) -> h``, gate and up
    ``[..., N]``; culture and set_ids one id per row (any shape with R elements, int32 spares a
    conversion), None = no recording / no ablation for this call; ``one_culture``: the only
    culture id among the rows when the caller knows it (-1: unknown), which spares the kernel
    its search. Ids are not range-checked here (the caller builds them checked, as
    ``instrument.rows`` does); the kernels ignore out-of-range ids.
    """

    def __init__(self, N: int, device: torch.device | str, *, act_fn: str, activation: str = "gate",
                 factor: float = 0.0, K: torch.Tensor | None = None, S: torch.Tensor | None = None,
                 Q: torch.Tensor | None = None, keep: torch.Tensor | None = None):  # fmt: skip
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as tensors report it: "cuda:0"
            device = torch.device("cuda", torch.cuda.current_device())
        can_record, can_ablate = K is not None, keep is not None
        if keep is not None and keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)  # same bytes, read as the kernel reads them
        probe = torch.empty(0, N, device=device)
        ids = torch.empty(0, dtype=torch.int32, device=device)
        check(OpArgs(probe, probe, ids, K, S, Q, keep, ids, act_fn, activation, can_record,
                     can_ablate))  # fmt: skip
        self.N, self.device = N, device
        self.act_fn, self.activation, self.factor = act_fn, activation, float(factor)
        self.K, self.S, self.Q, self.keep = K, S, Q, keep

    def __call__(self, gate: torch.Tensor, up: torch.Tensor, culture: torch.Tensor | None = None,
                 set_ids: torch.Tensor | None = None, one_culture: int = -1) -> torch.Tensor:  # fmt: skip
        N = self.N
        if (gate.shape != up.shape or gate.shape[-1] != N or gate.dtype != up.dtype
                or gate.dtype not in FLOAT_DTYPES or gate.device != self.device):
            refuse("gate and up must be [..., N] of one float dtype on the layer's device",
                  f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} "
                  f"{up.dtype}; N={N} on {self.device}",
                  "pass this layer's gate and up projections")  # fmt: skip
        flat = gate.dim() == 2  # the usual case: no reshapes (each costs a few us)
        gate2, up2 = (gate, up) if flat else (gate.reshape(-1, N), up.reshape(-1, N))
        R = gate2.shape[0]
        do_record = culture is not None
        do_ablate = set_ids is not None
        if do_record and (self.K is None or culture.numel() != R):
            refuse("culture must give one id per row of a recording op",
                  f"{None if culture is None else culture.numel()} ids for R={R}, "
                  f"recording={self.K is not None}", "pass culture only to a recording op")
        if do_ablate and (self.keep is None or set_ids.numel() != R):
            refuse("set_ids must give one id per row of an ablating op",
                  f"{set_ids.numel()} ids for R={R}, ablating={self.keep is not None}",
                  "pass set_ids only to an op bound to a keep mask")
        if do_record and culture.dim() != 1:
            culture = culture.reshape(R)
        if do_ablate and set_ids.dim() != 1:
            set_ids = set_ids.reshape(R)
        args = OpArgs(gate2, up2, culture, self.K, self.S, self.Q, self.keep, set_ids,
                      self.act_fn, self.activation, do_record, do_ablate, self.factor)  # fmt: skip
        if torch.compiler.is_compiling():
            h = via_op(args)
        else:
            h = run(args, one_culture if do_record else -1)
        return h if flat else h.view(gate.shape)
