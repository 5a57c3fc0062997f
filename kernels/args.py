"""The fused op's arguments: one record (:class:`OpArgs`) and the checks of its 2D contract.

Symbols: R rows (flattened tokens), N neurons, C cultures, num_sets ablation sets. The names
``ACT_FNS`` and ``ACTIVATIONS`` are owned here, at the bottom of the stack: the statistics and
the instrument import them (``culture_neurons.stats.ACTIVATIONS`` is this tuple).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from culture_neurons.errors import UsageError

ACT_FNS = ("silu", "gelu_tanh")  # act(g): SiLU or GELU-tanh
ACTIVATIONS = ("gate", "post")  # which tensor is recorded: a = act(gate), or h = act(gate) * up
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(slots=True)
class OpArgs:
    """One call of the 2D op, in the order of the custom op's schema.

    gate, up: ``[R, N]`` float; culture: ``[R]`` int (-1 = not counted); K, S, Q: ``[C, N]``
    int64 / fp64 / fp64 totals updated in place; keep: ``[num_sets, N]`` (nonzero = keep);
    set_ids: ``[R]`` int (-1 = no ablation); act_fn: one of ``ACT_FNS``; activation: one of
    ``ACTIVATIONS``; do_record / do_ablate: which of the tensors above are read (the others may
    be None or empty); factor: 0 ablates, ``1 + alpha`` steers.
    """

    gate: torch.Tensor
    up: torch.Tensor
    culture: torch.Tensor | None
    K: torch.Tensor | None
    S: torch.Tensor | None
    Q: torch.Tensor | None
    keep: torch.Tensor | None
    set_ids: torch.Tensor | None
    act_fn: str
    activation: str
    do_record: bool
    do_ablate: bool
    factor: float = 0.0

    def positional(self) -> tuple:
        """The fields in schema order (for the custom op and the public positional faces)."""
        return (self.gate, self.up, self.culture, self.K, self.S, self.Q, self.keep,
                self.set_ids, self.act_fn, self.activation, self.do_record, self.do_ablate,
                self.factor)  # fmt: skip

    @property
    def variant(self) -> tuple:
        """What the kernel compiles per: (act_fn, activation, record, ablate, steer)."""
        return (self.act_fn, self.activation, self.do_record, self.do_ablate,
                self.do_ablate and self.factor != 0.0)  # fmt: skip


def refuse(what: str, given: str, todo: str) -> None:
    """UsageError ``act_and_record: {what} (given: {given}); {todo}``."""
    raise UsageError(f"act_and_record: {what} (given: {given}); {todo}")


def check(args: OpArgs) -> None:
    """Raise ``UsageError`` naming the first inconsistent argument of the 2D op contract.

    Checks shapes, dtypes, devices and layout only: value ranges (culture id < C) would need a
    device sync, so they are checked by the wrapper for CPU tensors only; the kernels ignore
    out-of-range ids (never write out of bounds).
    """
    gate, up, culture, keep, set_ids = args.gate, args.up, args.culture, args.keep, args.set_ids
    if args.act_fn not in ACT_FNS:
        refuse("unknown act_fn", repr(args.act_fn), f"use one of {ACT_FNS}")
    if args.activation not in ACTIVATIONS:
        refuse("unknown activation", repr(args.activation), f"use one of {ACTIVATIONS}")
    if gate.dim() != 2 or gate.shape != up.shape:
        refuse("gate and up must be [R, N] of the same shape",
              f"{tuple(gate.shape)} and {tuple(up.shape)}", "flatten the token dims first")
    if gate.dtype not in FLOAT_DTYPES or up.dtype != gate.dtype:
        refuse("gate and up must share a float dtype (fp32/fp16/bf16)",
              f"{gate.dtype} and {up.dtype}", "cast one of them")
    if up.device != gate.device:
        refuse("gate and up on different devices", f"{gate.device}, {up.device}", "move them")
    R, N = gate.shape
    if args.do_record:
        if culture.shape != (R,) or culture.dtype not in (torch.int32, torch.int64):
            refuse("culture must be [R] int32/int64",
                  f"{tuple(culture.shape)} {culture.dtype} for R={R}",
                  "pass one culture id per row, -1 = not counted")
        K = args.K
        for name, acc, dtype in (("K", K, torch.int64), ("S", args.S, torch.float64),
                                 ("Q", args.Q, torch.float64)):
            if acc.dim() != 2 or acc.shape[1] != N or acc.shape[0] != K.shape[0]:
                refuse(f"{name} must be [C, N] with N={N} and the same C as K",
                      f"{name}{tuple(acc.shape)}, K{tuple(K.shape)}", "allocate [C, N]")
            if acc.dtype != dtype:
                refuse(f"{name} must be {dtype} (the statistics' totals)", str(acc.dtype),
                      f"allocate it as {dtype}")
            if not acc.is_contiguous():
                refuse(f"{name} must be contiguous [C, N]", f"strides {acc.stride()}",
                      "use a per-layer contiguous accumulator and copy into [C, L, N] at the end")
            if acc.device != gate.device or culture.device != gate.device:
                refuse(f"{name} and culture must be on gate's device",
                      f"{acc.device}, {culture.device} vs {gate.device}", "move them")
    if args.do_ablate:
        if keep.dim() != 2 or keep.shape[1] != N:
            refuse("keep must be [num_sets, N]", f"{tuple(keep.shape)} for N={N}",
                  "pass one keep mask row per ablation set (1 keep, 0 ablate)")
        if set_ids.shape != (R,) or set_ids.dtype not in (torch.int32, torch.int64):
            refuse("set_ids must be [R] int32/int64",
                  f"{tuple(set_ids.shape)} {set_ids.dtype} for R={R}",
                  "pass one set id per row, -1 = no ablation")
        if keep.device != gate.device or set_ids.device != gate.device:
            refuse("keep and set_ids must be on gate's device",
                  f"{keep.device}, {set_ids.device} vs {gate.device}", "move them")


def check_act_and_record_args(gate, up, culture, K, S, Q, keep, set_ids, act_fn: str,
                              activation: str, do_record: bool,
                              do_ablate: bool) -> None:  # fmt: skip
    """:func:`check` for the op's arguments given one by one (the public positional face)."""
    check(OpArgs(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                 do_ablate))  # fmt: skip
