"""The torch custom op behind the fused MLP backend, and its one face.

Symbols: R rows (flattened tokens), N neurons, C cultures, num_sets ablation sets.

``culture_neurons::act_and_record``: ``h = act(g) * u`` with per-culture ``K, S, Q`` totals
updated in place and optional per-row ablation (math in ``act_record.py``).

CUDA tensors run the Triton kernel; every other device runs the same math in PyTorch over row
chunks of bounded size (the production path on CPU), through
:mod:`culture_neurons.instrument.reduce`, the reduction every non-Triton path shares. Being a
custom op, both work under ``torch.compile`` and CUDA graphs. triton is imported only when a
CUDA kernel is launched, so this module imports on machines without triton.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
import torch.nn.functional as F

from culture_neurons.errors import UsageError
from culture_neurons.instrument import reduce
from culture_neurons.stats import ACTIVATIONS

ACT_FNS = ("silu", "gelu_tanh")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _fail(what: str, given: str, todo: str) -> None:
    raise UsageError(f"act_and_record: {what} (given: {given}); {todo}")


def check_act_and_record_args(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
) -> None:
    """Raise ``UsageError`` naming the first inconsistent argument of the 2D op contract.

    Checks shapes, dtypes, devices and layout only: value ranges (culture id < C) would need a
    device sync, so they are checked by the wrapper for CPU tensors only; the kernels ignore
    out-of-range ids (never write out of bounds).
    """
    if act_fn not in ACT_FNS:
        _fail("unknown act_fn", repr(act_fn), f"use one of {ACT_FNS}")
    if activation not in ACTIVATIONS:
        _fail("unknown activation", repr(activation), f"use one of {ACTIVATIONS}")
    if gate.dim() != 2 or gate.shape != up.shape:
        _fail("gate and up must be [R, N] of the same shape",
              f"{tuple(gate.shape)} and {tuple(up.shape)}", "flatten the token dims first")
    if gate.dtype not in FLOAT_DTYPES or up.dtype != gate.dtype:
        _fail("gate and up must share a float dtype (fp32/fp16/bf16)",
              f"{gate.dtype} and {up.dtype}", "cast one of them")
    if up.device != gate.device:
        _fail("gate and up on different devices", f"{gate.device}, {up.device}", "move them")
    R, N = gate.shape
    if do_record:
        if culture.shape != (R,) or culture.dtype not in (torch.int32, torch.int64):
            _fail("culture must be [R] int32/int64",
                  f"{tuple(culture.shape)} {culture.dtype} for R={R}",
                  "pass one culture id per row, -1 = not counted")
        for name, acc, dtype in (("K", K, torch.int64), ("S", S, torch.float64),
                                 ("Q", Q, torch.float64)):
            if acc.dim() != 2 or acc.shape[1] != N or acc.shape[0] != K.shape[0]:
                _fail(f"{name} must be [C, N] with N={N} and the same C as K",
                      f"{name}{tuple(acc.shape)}, K{tuple(K.shape)}", "allocate [C, N]")
            if acc.dtype != dtype:
                _fail(f"{name} must be {dtype} (the statistics' totals)", str(acc.dtype),
                      f"allocate it as {dtype}")
            if not acc.is_contiguous():
                _fail(f"{name} must be contiguous [C, N]", f"strides {acc.stride()}",
                      "use a per-layer contiguous accumulator and copy into [C, L, N] at the end")
            if acc.device != gate.device or culture.device != gate.device:
                _fail(f"{name} and culture must be on gate's device",
                      f"{acc.device}, {culture.device} vs {gate.device}", "move them")
    if do_ablate:
        if keep.dim() != 2 or keep.shape[1] != N:
            _fail("keep must be [num_sets, N]", f"{tuple(keep.shape)} for N={N}",
                  "pass one keep mask row per ablation set (1 keep, 0 ablate)")
        if set_ids.shape != (R,) or set_ids.dtype not in (torch.int32, torch.int64):
            _fail("set_ids must be [R] int32/int64",
                  f"{tuple(set_ids.shape)} {set_ids.dtype} for R={R}",
                  "pass one set id per row, -1 = no ablation")
        if keep.device != gate.device or set_ids.device != gate.device:
            _fail("keep and set_ids must be on gate's device",
                  f"{keep.device}, {set_ids.device} vs {gate.device}", "move them")


# --- PyTorch path (every device but CUDA) ------------------------------------------------------


def act_and_record_torch(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float = 0.0,
    chunk_rows: int = reduce.CHUNK_ROWS,
) -> torch.Tensor:
    """The op's math in PyTorch over row chunks; fp32 arithmetic, ``h`` in gate's dtype.

    Per chunk: one fp32 ``act`` (in place on the fp32 copy of a half-precision gate), the
    ablated neurons zeroed, ``h`` written in place when the input is fp32, and K/S/Q added by
    :func:`culture_neurons.instrument.reduce.accumulate` (one chunk at a time, so its
    temporaries stay bounded too).
    """
    R, N = gate.shape
    h = torch.empty((R, N), dtype=gate.dtype, device=gate.device)
    if R == 0 or N == 0:
        return h
    fp32_in = gate.dtype == torch.float32
    for start in range(0, R, chunk_rows):
        rows = slice(start, min(R, start + chunk_rows))
        if fp32_in:
            a = act(gate[rows], act_fn)  # fresh fp32 tensor
        else:
            a = _act_(gate[rows].float(), act_fn)  # in place on the fp32 copy
        if do_ablate:
            reduce.ablate_(a, keep, set_ids[rows], factor, chunk_rows)
        if fp32_in:
            h_c = torch.mul(a, up[rows], out=h[rows])
        else:
            h_c = a * up[rows]  # bf16/fp16 * fp32 promotes to fp32
            h[rows].copy_(h_c)
        if do_record:
            recorded = h_c if activation == "post" else a
            reduce.accumulate(K, S, Q, recorded, culture[rows], chunk_rows)
    return h


# --- the op ------------------------------------------------------------------------------------


@torch.library.custom_op("culture_neurons::act_and_record", mutates_args=("K", "S", "Q"))
def _act_and_record_op(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float,
) -> torch.Tensor:
    return act_and_record_torch(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                                do_record, do_ablate, factor)


@functools.cache
def _triton_module(name: str):
    """``culture_neurons.kernels.<name>`` (imports triton), or None with one warning saying why."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as exc:
        warnings.warn(f"culture_neurons.kernels: triton unavailable ({exc}); CUDA tensors take "
                      "the chunked PyTorch path (slower, same numbers)", stacklevel=3)
        return None


@_act_and_record_op.register_kernel("cuda")
def _act_and_record_cuda(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                         do_record, do_ablate, factor):
    kernel = _triton_module("act_record")  # lazy: triton only where CUDA runs
    run = kernel.act_and_record_triton if kernel else act_and_record_torch
    return run(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
               do_ablate, factor)


@_act_and_record_op.register_fake
def _act_and_record_fake(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                         do_record, do_ablate, factor):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


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
    value. Math in
    fp32 whatever the input dtype (sums are fp32 within a tile or chunk, then added to the fp64
    totals); ``h`` is returned in gate's dtype and shape.

    Returns:
        ``h`` ``[..., N]``, the input of down_proj.

    Raises:
        UsageError: inconsistent shapes, dtypes, devices, layouts or (CPU tensors) ids >= C or
            >= num_sets. On CUDA and under torch.compile such ids are not checked (that would
            read the data: a device sync per call) and the op ignores them.
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
    dev = gate.device
    empty_i = torch.empty(0, dtype=torch.int32, device=dev)
    rc = culture.reshape(R) if do_record else empty_i
    rs = set_ids.reshape(R) if do_ablate else empty_i
    if do_record:
        K_, S_, Q_ = K, S, Q
    else:
        K_ = torch.empty(0, N, dtype=torch.int64, device=dev)
        S_ = Q_ = torch.empty(0, N, dtype=torch.float64, device=dev)
    keep_ = keep if do_ablate else torch.empty(0, N, dtype=torch.uint8, device=dev)
    check_act_and_record_args(gate2, up2, rc, K_, S_, Q_, keep_, rs, act_fn, activation,
                              do_record, do_ablate)
    # Value checks read the data: only on CPU (no device sync) and outside torch.compile.
    check_values = dev.type == "cpu" and R > 0 and not torch.compiler.is_compiling()
    if do_record and check_values and int(rc.max()) >= K.shape[0]:
        raise UsageError(f"act_and_record: culture id {int(rc.max())} >= C = {K.shape[0]}; "
                         "allocate K, S, Q with one row per culture")
    if do_ablate and check_values and int(rs.max()) >= keep.shape[0]:
        raise UsageError(f"act_and_record: set id {int(rs.max())} >= num_sets = "
                         f"{keep.shape[0]}; pass one keep row per set")
    h = _act_and_record_op(gate2, up2, rc, K_, S_, Q_, keep_, rs, act_fn, activation,
                           do_record, do_ablate, float(factor))
    return h.reshape(shape)
