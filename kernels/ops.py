"""Torch custom ops behind the fused MLP backend: one op per kernel, one face per op.

Symbols: R rows (flattened tokens), N neurons, H hidden size, C cultures, num_sets ablation sets.

- ``culture_neurons::act_and_record``: ``h = act(g) * u`` with per-culture ``K, S, Q`` updated
  in place and optional per-row ablation (math in ``act_record.py``).
- ``culture_neurons::masked_down_proj``: ``out = (h * keep[row_set]) @ W^T`` (``masked_down.py``).

CUDA tensors run the Triton kernels; every other device runs the same math in PyTorch over
row chunks of bounded size (the production path on CPU). Being custom ops, both work under
``torch.compile`` and CUDA graphs. triton is imported only when a CUDA kernel is launched, so
this module imports on machines without triton.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
import torch.nn.functional as F

from culture_neurons.errors import UsageError

ACT_FNS = ("silu", "gelu_tanh")
RECORDS = ("gate", "post")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Rows per chunk on the PyTorch path: bounds the fp32 temporaries to chunk x N (4096 x 18944 x 4 B
# = 310 MB each) and keeps the counts, summed in fp32, exact (chunk < 2^24).
CHUNK_ROWS = 4096


def activation(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act(g)``: ``"silu"`` (g * sigmoid(g)) or ``"gelu_tanh"`` (torch ``gelu(approximate="tanh")``,
    ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``). The helper every backend uses."""
    if act_fn == "silu":
        return F.silu(g)
    if act_fn == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")


def _activation_(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``activation`` in place on ``g`` (a temporary the caller owns); returns g."""
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
    row_culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    row_set: torch.Tensor,
    act_fn: str,
    record: str,
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
    if record not in RECORDS:
        _fail("unknown record mode", repr(record), f"use one of {RECORDS}")
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
        if row_culture.shape != (R,) or row_culture.dtype not in (torch.int32, torch.int64):
            _fail("row_culture must be [R] int32/int64",
                  f"{tuple(row_culture.shape)} {row_culture.dtype} for R={R}",
                  "pass one culture id per row, -1 = not counted")
        for name, acc, dtype in (("K", K, torch.int32), ("S", S, torch.float32),
                                 ("Q", Q, torch.float32)):
            if acc.dim() != 2 or acc.shape[1] != N or acc.shape[0] != K.shape[0]:
                _fail(f"{name} must be [C, N] with N={N} and the same C as K",
                      f"{name}{tuple(acc.shape)}, K{tuple(K.shape)}", "allocate [C, N]")
            if acc.dtype != dtype:
                _fail(f"{name} must be {dtype}", str(acc.dtype), f"allocate it as {dtype}")
            if not acc.is_contiguous():
                _fail(f"{name} must be contiguous [C, N]", f"strides {acc.stride()}",
                      "use a per-layer contiguous accumulator and copy into [C, L, N] at the end")
            if acc.device != gate.device or row_culture.device != gate.device:
                _fail(f"{name} and row_culture must be on gate's device",
                      f"{acc.device}, {row_culture.device} vs {gate.device}", "move them")
    if do_ablate:
        if keep.dim() != 2 or keep.shape[1] != N:
            _fail("keep must be [num_sets, N]", f"{tuple(keep.shape)} for N={N}",
                  "pass one keep mask row per ablation set (1 keep, 0 ablate)")
        if row_set.shape != (R,) or row_set.dtype not in (torch.int32, torch.int64):
            _fail("row_set must be [R] int32/int64",
                  f"{tuple(row_set.shape)} {row_set.dtype} for R={R}",
                  "pass one set id per row, -1 = no ablation")
        if keep.device != gate.device or row_set.device != gate.device:
            _fail("keep and row_set must be on gate's device",
                  f"{keep.device}, {row_set.device} vs {gate.device}", "move them")


# --- PyTorch path (every device but CUDA) ------------------------------------------------------


def _keep_rows(keep_ext: torch.Tensor, row_set: torch.Tensor) -> torch.Tensor:
    """``[rows, N]`` fp32 mask: keep_ext is ``keep`` plus a final all-ones row that ids -1 and
    out-of-range ids point to, so no branch and no host sync is needed."""
    num_sets = keep_ext.shape[0] - 1
    no_set = (row_set < 0) | (row_set >= num_sets)
    return keep_ext.index_select(0, torch.where(no_set, num_sets, row_set))


def act_and_record_torch(
    gate: torch.Tensor,
    up: torch.Tensor,
    row_culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    row_set: torch.Tensor,
    act_fn: str,
    record: str,
    do_record: bool,
    do_ablate: bool,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """The op's math in PyTorch over row chunks; fp32 arithmetic, ``h`` in gate's dtype.

    Per chunk: one fp32 ``act`` (in place on the fp32 copy of a half-precision gate), ``h``
    written in place when the input is fp32, and K/S/Q reduced with ``index_add_`` into
    ``[C + 1, N]`` buffers whose last row takes the uncounted rows (-1). index_add_ is one pass
    over ``a`` (R x N adds); the one-hot ``[C, rows]`` matmul is C x R x N flops and measured
    ~10x slower (512 x 4096, C = 25, one core: 3 ms vs 0.3 ms). K goes through fp32 (exact:
    chunk < 2^24 rows; int32 index_add_ measured 30x slower) and is added as int32.
    """
    R, N = gate.shape
    dev = gate.device
    h = torch.empty((R, N), dtype=gate.dtype, device=dev)
    if R == 0 or N == 0:
        return h
    fp32_in = gate.dtype == torch.float32
    if do_ablate:
        ones = torch.ones(1, N, dtype=torch.float32, device=dev)
        keep_ext = torch.cat([(keep != 0).to(torch.float32), ones])
    if do_record:
        C = K.shape[0]
        # One [C + 1, N] buffer each for K (as fp32), S, Q: row C collects the uncounted rows.
        sums = torch.empty(3, C + 1, N, dtype=torch.float32, device=dev)
    for start in range(0, R, chunk_rows):
        stop = min(R, start + chunk_rows)
        if fp32_in:
            act = activation(gate[start:stop], act_fn)  # fresh fp32 tensor
        else:
            act = _activation_(gate[start:stop].float(), act_fn)  # in place on the fp32 copy
        if do_ablate:
            act.mul_(_keep_rows(keep_ext, row_set[start:stop]))
        if fp32_in:
            h_c = torch.mul(act, up[start:stop], out=h[start:stop])
        else:
            h_c = act * up[start:stop]  # bf16/fp16 * fp32 promotes to fp32
            h[start:stop].copy_(h_c)
        if not do_record:
            continue
        a = h_c if record == "post" else act
        rc = row_culture[start:stop]
        rows_to = torch.where((rc < 0) | (rc >= C), C, rc).long()
        sums.zero_()
        sums[1].index_add_(0, rows_to, a)
        # One scratch buffer serves [a > 0] and a^2 in turn; reuse a dead fp32 temporary
        # (act once h is written, or the fp32 h of a half-precision input) where there is one.
        if record == "post":
            scratch = act
        elif not fp32_in:
            scratch = h_c
        else:
            scratch = torch.empty_like(a)
        torch.gt(a, 0, out=scratch)
        sums[0].index_add_(0, rows_to, scratch)
        torch.mul(a, a, out=scratch)
        sums[2].index_add_(0, rows_to, scratch)
        K.add_(sums[0, :C].to(torch.int32))
        S.add_(sums[1, :C])
        Q.add_(sums[2, :C])
    return h


# --- the op ------------------------------------------------------------------------------------


@torch.library.custom_op("culture_neurons::act_and_record", mutates_args=("K", "S", "Q"))
def _act_and_record_op(
    gate: torch.Tensor,
    up: torch.Tensor,
    row_culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    row_set: torch.Tensor,
    act_fn: str,
    record: str,
    do_record: bool,
    do_ablate: bool,
) -> torch.Tensor:
    return act_and_record_torch(gate, up, row_culture, K, S, Q, keep, row_set, act_fn, record,
                                do_record, do_ablate)


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
def _act_and_record_cuda(gate, up, row_culture, K, S, Q, keep, row_set, act_fn, record,
                         do_record, do_ablate):
    kernel = _triton_module("act_record")  # lazy: triton only where CUDA runs
    run = kernel.act_and_record_triton if kernel else act_and_record_torch
    return run(gate, up, row_culture, K, S, Q, keep, row_set, act_fn, record, do_record,
               do_ablate)


@_act_and_record_op.register_fake
def _act_and_record_fake(gate, up, row_culture, K, S, Q, keep, row_set, act_fn, record,
                         do_record, do_ablate):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def act_and_record(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    act_fn: str = "silu",
    record: str = "gate",
    row_culture: torch.Tensor | None = None,
    K: torch.Tensor | None = None,
    S: torch.Tensor | None = None,
    Q: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    row_set: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h = act(gate) * up`` (ablated neurons zeroed), recording per-culture statistics.

    Args:
        gate: ``[..., N]`` ``gate_proj(x)``, fp32/fp16/bf16; the leading dims are the R rows.
        up: ``[..., N]`` ``up_proj(x)``, same shape and dtype as gate.
        act_fn: ``"silu"`` or ``"gelu_tanh"``.
        record: which tensor is ``a``: ``"gate"`` (``act(gate)``) or ``"post"`` (``h``).
        row_culture: ``[...]`` (gate's leading dims) int32/int64 culture id per row,
            ``-1`` = row not counted (padding, out of scope). None: record nothing.
        K: ``[C, N]`` int32 contiguous, ``K[c, j] += #rows of c with a[r, j] > 0``.
        S: ``[C, N]`` fp32 contiguous, ``S[c, j] += sum of a[r, j]`` over rows of c.
        Q: ``[C, N]`` fp32 contiguous, ``Q[c, j] += sum of a[r, j]^2`` over rows of c.
        keep: ``[num_sets, N]`` bool/uint8/float, nonzero = keep, 0 = ablate. None: no ablation.
        row_set: ``[...]`` int32/int64 ablation set id per row, ``-1`` = no ablation.

    Ablated neurons have ``a = 0`` and ``h = 0``; the statistics see the ablated value. Math in
    fp32 whatever the input dtype; ``h`` is returned in gate's dtype and shape.

    Returns:
        ``h`` ``[..., N]``, the input of down_proj.

    Raises:
        UsageError: inconsistent shapes, dtypes, devices, layouts or (CPU tensors) ids >= C or
            >= num_sets. On CUDA and under torch.compile such ids are not checked (that would
            read the data: a device sync per call) and the ops ignore them.
    """
    shape = gate.shape
    N = shape[-1]
    gate2, up2 = gate.reshape(-1, N), up.reshape(-1, N)
    R = gate2.shape[0]
    do_record = row_culture is not None
    if do_record and (K is None or S is None or Q is None):
        raise UsageError("act_and_record: row_culture given without K, S and Q; "
                         "pass all four to record, or none")
    do_ablate = keep is not None
    if do_ablate != (row_set is not None):
        raise UsageError("act_and_record: keep and row_set go together "
                         f"(given keep={keep is not None}, row_set={row_set is not None})")
    if do_record and row_culture.shape != shape[:-1]:
        raise UsageError(f"act_and_record: row_culture must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(row_culture.shape)}")
    if do_ablate and row_set.shape != shape[:-1]:
        raise UsageError(f"act_and_record: row_set must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(row_set.shape)}")
    dev = gate.device
    empty_i = torch.empty(0, dtype=torch.int32, device=dev)
    empty_f = torch.empty(0, N, dtype=torch.float32, device=dev)
    rc = row_culture.reshape(R) if do_record else empty_i
    rs = row_set.reshape(R) if do_ablate else empty_i
    K_, S_, Q_ = (K, S, Q) if do_record else (empty_i.reshape(0, 1), empty_f, empty_f)
    keep_ = keep if do_ablate else empty_f
    check_act_and_record_args(gate2, up2, rc, K_, S_, Q_, keep_, rs, act_fn, record,
                              do_record, do_ablate)
    # Value checks read the data: only on CPU (no device sync) and outside torch.compile.
    check_values = dev.type == "cpu" and R > 0 and not torch.compiler.is_compiling()
    if do_record and check_values and int(rc.max()) >= K.shape[0]:
        raise UsageError(f"act_and_record: culture id {int(rc.max())} >= C = {K.shape[0]}; "
                         "allocate K, S, Q with one row per culture")
    if do_ablate and check_values and int(rs.max()) >= keep.shape[0]:
        raise UsageError(f"act_and_record: set id {int(rs.max())} >= num_sets = "
                         f"{keep.shape[0]}; pass one keep row per set")
    h = _act_and_record_op(gate2, up2, rc, K_, S_, Q_, keep_, rs, act_fn, record,
                           do_record, do_ablate)
    return h.reshape(shape)


# --- masked down projection ----------------------------------------------------------------------


def check_masked_down_args(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                           row_set: torch.Tensor) -> None:
    """Raise ``UsageError`` naming the first inconsistent argument of ``masked_down_proj``."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise UsageError(f"masked_down_proj: need h [R, N] and weight [H, N], given "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}; pass down_proj.weight")
    if h.dtype not in FLOAT_DTYPES or weight.dtype != h.dtype:
        raise UsageError(f"masked_down_proj: h and weight must share a float dtype, given "
                         f"{h.dtype} and {weight.dtype}; cast one of them")
    if keep.dim() != 2 or keep.shape[1] != h.shape[1]:
        raise UsageError(f"masked_down_proj: keep must be [num_sets, N={h.shape[1]}], given "
                         f"{tuple(keep.shape)}")
    if row_set.shape != (h.shape[0],) or row_set.dtype not in (torch.int32, torch.int64):
        raise UsageError(f"masked_down_proj: row_set must be [R={h.shape[0]}] int32/int64, "
                         f"given {tuple(row_set.shape)} {row_set.dtype}; -1 = no ablation")
    for name, t in (("weight", weight), ("keep", keep), ("row_set", row_set)):
        if t.device != h.device:
            raise UsageError(f"masked_down_proj: {name} on {t.device}, h on {h.device}; "
                             "move them to one device")


def _masked_down_proj_torch(h, weight, keep, row_set):
    N = h.shape[1]
    ones = torch.ones(1, N, dtype=h.dtype, device=h.device)
    keep_ext = torch.cat([(keep != 0).to(h.dtype), ones])
    return F.linear(h * _keep_rows(keep_ext, row_set), weight)


@torch.library.custom_op("culture_neurons::masked_down_proj", mutates_args=())
def _masked_down_proj_op(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                         row_set: torch.Tensor) -> torch.Tensor:
    return _masked_down_proj_torch(h, weight, keep, row_set)


@_masked_down_proj_op.register_kernel("cuda")
def _masked_down_proj_cuda(h, weight, keep, row_set):
    kernel = _triton_module("masked_down")  # lazy: triton only where CUDA runs
    if kernel is None:
        return _masked_down_proj_torch(h, weight, keep, row_set)
    return kernel.masked_down_triton(h, weight, keep, row_set)


@_masked_down_proj_op.register_fake
def _masked_down_proj_fake(h, weight, keep, row_set):
    return h.new_empty((h.shape[0], weight.shape[0]))


def masked_down_proj(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                     row_set: torch.Tensor) -> torch.Tensor:
    """``out [..., H] = (h * keep[row_set]) @ weight^T``, bias-free (down_proj with ablation).

    Args:
        h: ``[..., N]`` fp32/fp16/bf16, the input of down_proj (``act(g) * u``).
        weight: ``[H, N]`` ``down_proj.weight``, same dtype as h.
        keep: ``[num_sets, N]`` bool/uint8/float, nonzero = keep, 0 = ablate.
        row_set: ``[...]`` (h's leading dims) int32/int64 set id per row, ``-1`` = no ablation.

    On CUDA the mask is applied to h's tile as it is loaded by a Triton GEMM (fp32 accumulate);
    elsewhere it is ``F.linear(h * mask, weight)``.
    """
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    rs = row_set.reshape(-1)
    check_masked_down_args(h2, weight, keep, rs)
    out = _masked_down_proj_op(h2, weight, keep, rs)
    return out.reshape(*shape[:-1], weight.shape[0])
