"""Fused gated-MLP activation, per-culture statistics and ablation in one pass (Triton).

Symbols: R rows (flattened tokens), N neurons, C cultures, num_sets ablation sets.
Inputs ``g = gate_proj(x)``, ``u = up_proj(x)`` as ``[R, N]``; ``m[r, j] = 1`` where
``keep[set_ids[r], j]`` is nonzero or ``set_ids[r] = -1``, else ``factor`` (0: ablation, exactly;
``1 + alpha``: steering); ``act`` is SiLU or GELU-tanh; arithmetic in fp32:

    h[r, j]  = act(g[r, j]) * u[r, j] * m[r, j]              (input dtype, fed to down_proj)
    a[r, j]  = act(g[r, j]) * m[r, j]  (activation="gate")  or  h[r, j] in fp32  ("post")
    K[c, j] += sum_{r: culture[r] = c} [a[r, j] > 0]         (int32 per tile, int64 total)
    S[c, j] += sum_{r: culture[r] = c} a[r, j]               (fp32 per tile, fp64 total)
    Q[c, j] += sum_{r: culture[r] = c} a[r, j]^2             (fp32 per tile, fp64 total)

Rows with ``culture[r] = -1`` are not counted (the caller folds padding and scope into -1).
Each program owns a ``[BLOCK_R, BLOCK_N]`` tile. It reduces the tile's rows per culture in
registers (K, S and Q in one three-operand reduction) and issues ONE atomic per (culture,
column) per tile straight into the int64 / fp64 totals: no working accumulators, nothing to
fold after the call. Only the cultures the tile holds are visited: one culture (the usual case,
rows of a batch being grouped by item) takes a loop-free path; several are stepped through in
increasing order of the ids present, never over the gaps between them. The host may name the
only culture of the whole call (``one_culture``), which spares the tile its search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from culture_neurons.errors import UsageError

from .args import ACT_FNS, OpArgs, check

# Activation ids passed as constexpr (ints compile the same on every triton >= 3.0).
ACT_IDS = {name: i for i, name in enumerate(ACT_FNS)}  # silu: 0, gelu_tanh: 1


@dataclass(frozen=True)
class Tile:
    """A launch configuration: ``BLOCK_R x BLOCK_N`` elements per program, ``num_warps``."""

    block_r: int
    block_n: int
    num_warps: int


# One tile per GPU architecture (compute capability), each chosen by measurement on the card
# named beside it (bench/gpu_check.py sweeps the candidates and writes its numbers to
# bench/RESULTS.md). No card has been lent yet, so both rows hold the compile-time choice:
# 32 x 128 at 4 warps is 32 fp32 values per thread per tensor, as 64 x 128 at 8 warps, but with
# half the registers per CTA, so ~2x the CTAs per SM (ptxas numbers per arch and triton version:
# bench/RESULTS.md "Compile-time numbers"), and the per-tile reductions span 4 warps, not 8.
TILES = {
    (8, 0): Tile(32, 128, 4),  # A100 (sm_80): not measured on a card yet
    (9, 0): Tile(32, 128, 4),  # H100 / H200 (sm_90): not measured on a card yet
}
DEFAULT_TILE = Tile(32, 128, 4)  # other architectures
# The interpreter runs each program in Python (~15 ms): small tiles make tiny test shapes
# span several tiles with ragged edges.
INTERPRETER_TILE = Tile(16, 32, 1)


@functools.cache
def _cuda_tile(index: int) -> Tile:
    return TILES.get(torch.cuda.get_device_capability(index), DEFAULT_TILE)


def tile_for(device: torch.device) -> Tile:
    """The production tile of ``device``: ``TILES`` by compute capability on CUDA."""
    if device.type != "cuda":
        return INTERPRETER_TILE
    return _cuda_tile(device.index if device.index is not None else torch.cuda.current_device())


def device_of(t: torch.Tensor):
    """Context making t's GPU the current one (a no-op for CPU tensors in the interpreter).

    Triton launches on the *current* CUDA device: with layers spread over GPUs
    (device_map="auto") that need not be t's. Entered only when it differs (it costs a few us).
    """
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def _tanh(z):
    """tanh in fp32 from one exp of a non-positive argument (no overflow, no tanh intrinsic)."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, t, -t)


@triton.jit
def _act(g, ACT_FN: tl.constexpr):
    """act(g) in fp32, in the same form as torch, so that a rounds to 0 where torch's does.

    GELU-tanh stays 0.5 g (1 + tanh z) on purpose: below g ~ -5.06, 1 + tanh(z) rounds to 0 in
    fp32 (torch and this kernel alike, checked on 2e5 points in [-6, -4]), while the sigmoid
    form g / (1 + exp(-2z)) would give a tiny nonzero a whose sign (times u) flips K["post"]
    against the hooks backend.
    """
    if ACT_FN == 0:  # silu: g * sigmoid(g), as torch: g / (1 + exp(-g))
        return g / (1.0 + tl.exp(-g))
    else:  # gelu_tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + _tanh(z))


@triton.jit
def _tile(gate_ptr, up_ptr, keep_ptr, set_ids_ptr, rows, cols, row_ok, tile_ok, num_sets, factor,
          stride_gate_r, stride_up_r, stride_keep_s, stride_keep_n,
          ACT_FN: tl.constexpr, RECORD_POST: tl.constexpr, DO_ABLATE: tl.constexpr,
          STEER: tl.constexpr):
    """``(h, a)`` of one tile in fp32: ``h = act(g) * m * u`` and the recorded ``a``."""
    # Load and cast to fp32 at once: all arithmetic is fp32 whatever the input dtype.
    g = tl.load(gate_ptr + rows[:, None] * stride_gate_r + cols[None, :], mask=tile_ok, other=0.0)
    u = tl.load(up_ptr + rows[:, None] * stride_up_r + cols[None, :], mask=tile_ok, other=0.0)
    act = _act(g.to(tl.float32), ACT_FN)
    if DO_ABLATE:
        set_id = tl.load(set_ids_ptr + rows, mask=row_ok, other=-1)
        ablated_row = (set_id >= 0) & (set_id < num_sets)
        keep_offs = set_id.to(tl.int64)[:, None] * stride_keep_s + cols[None, :] * stride_keep_n
        keep = tl.load(keep_ptr + keep_offs, mask=tile_ok & ablated_row[:, None], other=1)
        if STEER:
            act = tl.where(keep != 0, act, act * factor)
        else:
            act = tl.where(keep != 0, act, 0.0)
    h = act * u.to(tl.float32)
    # Masked rows/columns hold a = 0 (loads use other=0), so they add nothing to K, S, Q.
    if RECORD_POST:
        return h, h
    else:
        return h, act


@triton.jit
def _add_culture(a, in_c, c, K_ptr, S_ptr, Q_ptr, N, cols, col_ok):
    """K/S/Q[c, cols] += the sums over the tile's rows ``in_c``: one atomic per column each."""
    a_c = tl.where(in_c[:, None], a, 0.0)
    k = tl.sum((a_c > 0).to(tl.int32), axis=0)
    s = tl.sum(a_c, axis=0)
    q = tl.sum(a_c * a_c, axis=0)
    offs = c * N + cols  # int32 is enough: the launcher checks C * N < 2^31
    # Straight into the int64 / fp64 totals (atom.add.u64 / .f64, sm_60+); relaxed: only the
    # sums matter, not ordering against other memory (no fence).
    tl.atomic_add(K_ptr + offs, k.to(tl.int64), mask=col_ok, sem="relaxed")
    tl.atomic_add(S_ptr + offs, s.to(tl.float64), mask=col_ok, sem="relaxed")
    tl.atomic_add(Q_ptr + offs, q.to(tl.float64), mask=col_ok, sem="relaxed")


@triton.jit(do_not_specialize=["one_culture"])  # -1, 0, 1...: one compiled kernel for all
def _act_record_kernel(
    # inputs
    gate_ptr,  # [R, N] fp32/fp16/bf16, unit column stride
    up_ptr,  # [R, N] same dtype as gate, unit column stride
    culture_ptr,  # [R] int32, -1 = row not counted
    keep_ptr,  # [num_sets, N] uint8/float, nonzero = keep (read only if DO_ABLATE)
    set_ids_ptr,  # [R] int32, -1 = no ablation (read only if DO_ABLATE)
    # outputs
    h_ptr,  # [R, N] same dtype as gate, unit column stride
    # accumulators
    K_ptr,  # [C, N] int64, contiguous
    S_ptr,  # [C, N] fp64, contiguous
    Q_ptr,  # [C, N] fp64, contiguous
    # sizes
    R,  # rows
    N,  # neurons
    C,  # cultures (ids >= C are ignored, so a bad id can never write out of bounds)
    num_sets,  # ablation sets (ids >= num_sets mean no ablation)
    one_culture,  # the call's only culture if the host knows it (every row c or -1), else -1
    factor,  # fp32: what a selected neuron's act is multiplied by (read only if STEER)
    # strides
    stride_gate_r,
    stride_up_r,
    stride_h_r,
    stride_keep_s,
    stride_keep_n,
    # constexprs
    ACT_FN: tl.constexpr,  # 0 silu, 1 gelu_tanh
    RECORD_POST: tl.constexpr,  # activation "post": a = h; "gate": a = act(g) * m
    DO_RECORD: tl.constexpr,
    DO_ABLATE: tl.constexpr,
    STEER: tl.constexpr,  # False: selected neurons set to exactly 0; True: scaled by factor
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 1D grid, column tile fastest: programs running together update different columns,
    # so their atomics rarely collide (and axis 1 of a grid is capped at 65535).
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_tiles
    pid_r = pid // num_n_tiles

    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: R * N may pass 2^31
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < N
    tile_ok = row_ok[:, None] & col_ok[None, :]

    h, a = _tile(gate_ptr, up_ptr, keep_ptr, set_ids_ptr, rows, cols, row_ok, tile_ok, num_sets,
                 factor, stride_gate_r, stride_up_r, stride_keep_s, stride_keep_n,
                 ACT_FN, RECORD_POST, DO_ABLATE, STEER)
    tl.store(h_ptr + rows[:, None] * stride_h_r + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tile_ok)

    if DO_RECORD:
        culture = tl.load(culture_ptr + rows, mask=row_ok, other=-1)
        culture = tl.where(culture < C, culture, -1)
        if one_culture >= 0:  # the host knows: no search (a tile of padding only adds zeros)
            c_first = one_culture
            c_last = one_culture
        else:  # the smallest and largest id present; (C, -1) when no row of the tile counts
            c_first = tl.min(tl.where(culture >= 0, culture, C), axis=0)
            c_last = tl.max(culture, axis=0)
        if c_first == c_last:  # one culture: loop-free
            _add_culture(a, culture == c_first, c_first, K_ptr, S_ptr, Q_ptr, N, cols, col_ok)
        elif c_first < c_last:  # several: each id present once, in increasing order
            c = c_first
            while c <= c_last:
                # a is recomputed (its loads hit L2) instead of kept live across the loop, which
                # would cost every tile ~50 more registers per thread for the rare mixed ones.
                _, a_again = _tile(gate_ptr, up_ptr, keep_ptr, set_ids_ptr, rows, cols, row_ok,
                                   tile_ok, num_sets, factor, stride_gate_r, stride_up_r,
                                   stride_keep_s, stride_keep_n, ACT_FN, RECORD_POST, DO_ABLATE,
                                   STEER)
                _add_culture(a_again, culture == c, c, K_ptr, S_ptr, Q_ptr, N, cols, col_ok)
                c = tl.min(tl.where(culture > c, culture, C), axis=0)  # the next id present


# --- launcher ----------------------------------------------------------------------------------


def prepare(args: OpArgs) -> OpArgs:
    """The op's arguments as the kernel reads them: unit column strides, int32 ids, uint8 keep,
    and ``gate`` standing in for every unused pointer (never dereferenced). The same record
    when they already are (the bound per-layer path of ``ops.LayerOp`` passes them that way)."""
    gate, up, culture, K, S, Q = args.gate, args.up, args.culture, args.K, args.S, args.Q
    keep, set_ids = args.keep, args.set_ids
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    if not args.do_record:
        culture = K = S = Q = gate
    elif culture.dtype != torch.int32:
        culture = culture.to(torch.int32)
    if not args.do_ablate:
        keep = set_ids = gate
    else:
        if set_ids.dtype != torch.int32:
            set_ids = set_ids.to(torch.int32)
        if keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)  # same bytes; triton loads uint8 everywhere
    return dataclasses.replace(args, gate=gate, up=up, culture=culture, K=K, S=S, Q=Q, keep=keep,
                               set_ids=set_ids)  # fmt: skip


def launch(args: OpArgs, one_culture: int = -1, tile: Tile | None = None) -> torch.Tensor:
    """Allocate ``h`` and launch, nothing else: arguments as :func:`prepare` returns them (unit
    column strides; int32 ids; ``gate`` for every unused tensor), already checked (by
    :func:`act_and_record_triton` or once per layer by ``ops.LayerOp``)."""
    gate, keep, do_record, do_ablate = args.gate, args.keep, args.do_record, args.do_ablate
    R, N = gate.shape
    h = torch.empty((R, N), dtype=gate.dtype, device=gate.device)
    if R == 0 or N == 0:
        return h
    tile = tile or tile_for(gate.device)
    C = args.K.shape[0] if do_record else 0
    if do_record and C * N >= 2**31:
        raise UsageError(f"act_and_record: accumulators [C={C}, N={N}] pass 2^31 elements; "
                         "record fewer cultures per call")
    # Python ceil-divisions: triton.cdiv is a JIT function, ~10 us per host call.
    grid = (-(-R // tile.block_r) * -(-N // tile.block_n),)
    with device_of(gate):
        _act_record_kernel[grid](
            gate, args.up, args.culture, keep, args.set_ids,
            h,
            args.K, args.S, args.Q,
            R, N, C, keep.shape[0] if do_ablate else 0, one_culture, float(args.factor),
            gate.stride(0), args.up.stride(0), h.stride(0),
            keep.stride(0) if do_ablate else 0, keep.stride(1) if do_ablate else 0,
            ACT_FN=ACT_IDS[args.act_fn],
            RECORD_POST=args.activation == "post",
            DO_RECORD=do_record,
            DO_ABLATE=do_ablate,
            STEER=do_ablate and args.factor != 0.0,
            BLOCK_R=tile.block_r,
            BLOCK_N=tile.block_n,
            num_warps=tile.num_warps,
        )  # fmt: skip
    return h


def act_and_record_triton(
    gate: torch.Tensor,  # [R, N]
    up: torch.Tensor,  # [R, N]
    culture: torch.Tensor,  # [R] int32 (any int is converted)
    K: torch.Tensor,  # [C, N] int64, contiguous, updated in place
    S: torch.Tensor,  # [C, N] fp64, contiguous, updated in place
    Q: torch.Tensor,  # [C, N] fp64, contiguous, updated in place
    keep: torch.Tensor,  # [num_sets, N], nonzero = keep
    set_ids: torch.Tensor,  # [R] int32 (any int is converted)
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float = 0.0,
    *,
    one_culture: int = -1,
    block_r: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Check, allocate, launch; returns ``h [R, N]`` (gate's dtype). See the module docstring.

    Unused tensors (``K, S, Q, culture`` when ``do_record`` is False, ``keep, set_ids`` when
    ``do_ablate`` is False) may be empty; they are never read. ``one_culture``: the only culture
    id of the call's rows, if the caller knows it (-1: the kernel finds each tile's ids).
    ``block_r``/``block_n``/``num_warps`` override the tile (tests use small tiles to get
    several tiles and masked edges on tiny shapes; bench/gpu_check.py sweeps them).
    """
    args = OpArgs(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                  do_ablate, factor)  # fmt: skip
    check(args)
    tile = tile_for(gate.device)
    tile = Tile(block_r or tile.block_r, block_n or tile.block_n, num_warps or tile.num_warps)
    return launch(prepare(args), one_culture, tile)
