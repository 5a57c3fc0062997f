"""The fused op's PyTorch path (every device but CUDA; the production path on CPU).

``h = act(g) * u`` over row chunks of bounded size, the ablated (or steered) neurons scaled,
and ``K, S, Q`` added by :func:`.reduce.accumulate`, the reduction every non-Triton path shares.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from culture_neurons.errors import UsageError

from . import reduce
from .args import ACT_FNS, OpArgs


def act(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act(g)``: ``"silu"`` (g * sigmoid(g)) or ``"gelu_tanh"`` (torch ``gelu(approximate="tanh")``,
    ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``). The helper every backend uses."""
    if act_fn == "silu":
        return F.silu(g)
    if act_fn == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")


def _act_(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act`` in place on ``g`` (a temporary the caller owns); returns g."""
    if act_fn == "silu":
        return F.silu(g, inplace=True)
    if act_fn == "gelu_tanh":
        return torch.ops.aten.gelu_(g, approximate="tanh")
    raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")


def act_and_record_torch(
    gate: torch.Tensor,  # [R, N]
    up: torch.Tensor,  # [R, N]
    culture: torch.Tensor,  # [R] int, -1 = not counted
    K: torch.Tensor,  # [C, N] int64, updated in place
    S: torch.Tensor,  # [C, N] fp64, updated in place
    Q: torch.Tensor,  # [C, N] fp64, updated in place
    keep: torch.Tensor,  # [num_sets, N], nonzero = keep
    set_ids: torch.Tensor,  # [R] int, -1 = no ablation
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float = 0.0,
    chunk_rows: int | None = None,  # None: reduce.chunk_rows_for(gate)
) -> torch.Tensor:
    """The op's 2D contract (arguments as :class:`.args.OpArgs`) in PyTorch: see :func:`run`."""
    args = OpArgs(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                  do_ablate, factor)  # fmt: skip
    return run(args, chunk_rows)


def run(args: OpArgs, chunk_rows: int | None = None) -> torch.Tensor:
    """The op's math in PyTorch over row chunks; fp32 arithmetic, ``h`` in gate's dtype.

    Per chunk: one fp32 ``act`` (in place on the fp32 copy of a half-precision gate), the
    ablated neurons zeroed, ``h`` written in place when the input is fp32, and K/S/Q added by
    :func:`.reduce.accumulate` (one chunk at a time, so its temporaries stay bounded too). A
    call of one chunk (decode steps, most prompts) slices nothing and allocates only what it
    returns.
    """
    gate = args.gate
    chunk_rows = chunk_rows or reduce.chunk_rows_for(gate)
    R, N = gate.shape
    if R <= chunk_rows:
        return _chunk(args, None, chunk_rows)
    h = torch.empty((R, N), dtype=gate.dtype, device=gate.device)
    for start in range(0, R, chunk_rows):
        rows = slice(start, min(R, start + chunk_rows))
        part = dataclasses.replace(
            args, gate=gate[rows], up=args.up[rows],
            culture=args.culture[rows] if args.do_record else None,
            set_ids=args.set_ids[rows] if args.do_ablate else None)  # fmt: skip
        _chunk(part, h[rows], chunk_rows)
    return h


def _chunk(args: OpArgs, out: torch.Tensor | None, chunk_rows: int) -> torch.Tensor:
    """One chunk of :func:`run`; ``h`` into ``out`` (a new tensor if None)."""
    gate, up = args.gate, args.up
    fp32_in = gate.dtype == torch.float32
    a = act(gate, args.act_fn) if fp32_in else _act_(gate.float(), args.act_fn)  # fresh fp32
    if args.do_ablate:
        reduce.ablate_(a, args.keep, args.set_ids, args.factor, chunk_rows)
    h = torch.mul(a, up, out=out) if fp32_in else a * up  # bf16/fp16 * fp32 promotes to fp32
    if args.do_record:
        recorded = h if args.activation == "post" else a
        reduce.accumulate(args.K, args.S, args.Q, recorded, args.culture, chunk_rows)
    if fp32_in:
        return h
    return h.to(gate.dtype) if out is None else out.copy_(h)
