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
Each program owns a ``[BLOCK_R, BLOCK_N]`` tile: it reduces the tile's rows per culture in
registers and issues ONE atomic per (culture, column) per tile straight into the int64 / fp64
totals (no working accumulators to fold after the call), looping over the culture ids present
in the tile (rows of a batch are grouped by item, so a tile holds one or two cultures).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from culture_neurons.errors import UsageError

from .ops import ACT_FNS, check_act_and_record_args

# Activation ids passed as constexpr (ints compile the same on every triton >= 3.0).
ACT_IDS = {name: i for i, name in enumerate(ACT_FNS)}  # silu: 0, gelu_tanh: 1

# Tile and warps on GPU: a 64 x 128 fp32 tile is 32 values per thread per tensor at 8 warps,
# and 64 rows per atomic keep the atomics (C_tile x 128 per tile) far below the tile's loads.
# Not yet tuned on a card: bench/gpu_check.py measures it.
BLOCK_R_GPU, BLOCK_N_GPU, NUM_WARPS_GPU = 64, 128, 8


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_of(t: torch.Tensor):
    """Context making t's GPU the current one (a no-op for CPU tensors in the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    tl.store(h_ptr + rows[:, None] * stride_h_r + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tile_ok)

    if DO_RECORD:
        if RECORD_POST:
            a = h
        else:
            a = act
        # Masked rows/columns hold a = 0 (loads use other=0), so they add nothing to K, S, Q.
        culture = tl.load(culture_ptr + rows, mask=row_ok, other=-1)
        culture = tl.where(culture < C, culture, -1)
        c_lo = tl.min(tl.where(culture >= 0, culture, C), axis=0)
        c_hi = tl.max(culture, axis=0)  # -1 when no row of the tile is counted: empty loop
        for c in range(c_lo, c_hi + 1):
            in_c = culture == c
            if tl.sum(in_c.to(tl.int32), axis=0) > 0:  # skip ids absent between lo and hi
                a_c = tl.where(in_c[:, None], a, 0.0)
                k = tl.sum((a_c > 0).to(tl.int32), axis=0)
                s = tl.sum(a_c, axis=0)
                q = tl.sum(a_c * a_c, axis=0)
                acc_offs = c * N + cols  # int32 is enough: the launcher checks C * N < 2^31
                # Straight into the int64 / fp64 totals (atom.add.u64 / .f64, sm_60+); relaxed:
                # only the sums matter, not ordering against other memory (no fence).
                tl.atomic_add(K_ptr + acc_offs, k.to(tl.int64), mask=col_ok, sem="relaxed")
                tl.atomic_add(S_ptr + acc_offs, s.to(tl.float64), mask=col_ok, sem="relaxed")
                tl.atomic_add(Q_ptr + acc_offs, q.to(tl.float64), mask=col_ok, sem="relaxed")


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
    block_r: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the fused kernel; returns ``h [R, N]`` (gate's dtype). See the module docstring.

    Unused tensors (``K, S, Q, culture`` when ``do_record`` is False, ``keep, set_ids`` when
    ``do_ablate`` is False) may be empty; they are never read. ``block_r``/``block_n`` override
    the tile (tests use small tiles to get several tiles and masked edges on tiny shapes).
    """
    # check
    check_act_and_record_args(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                              do_record, do_ablate)
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    R, N = gate.shape
    if do_record and culture.dtype != torch.int32:
        culture = culture.to(torch.int32)
    if do_ablate:
        if set_ids.dtype != torch.int32:
            set_ids = set_ids.to(torch.int32)
        if keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)  # same bytes; triton loads uint8 everywhere
    # Unused pointers still need a tensor: gate itself is never dereferenced through them.
    if not do_record:
        culture, K, S, Q = gate, gate, gate, gate
    if not do_ablate:
        keep, set_ids = gate, gate

    # allocate
    h = torch.empty((R, N), dtype=gate.dtype, device=gate.device)
    if R == 0 or N == 0:
        return h

    # launch
    if block_r is None:
        block_r = 16 if interpreting() else BLOCK_R_GPU
    if block_n is None:
        block_n = 32 if interpreting() else BLOCK_N_GPU
    if num_warps is None:
        num_warps = NUM_WARPS_GPU
    grid = (triton.cdiv(R, block_r) * triton.cdiv(N, block_n),)
    C = K.shape[0] if do_record else 0
    if C * N >= 2**31:
        raise UsageError(f"act_and_record: accumulators [C={C}, N={N}] pass 2^31 elements; "
                         "record fewer cultures per call")
    num_sets = keep.shape[0] if do_ablate else 0
    # Triton launches on the *current* CUDA device: with layers spread over GPUs
    # (device_map="auto") that need not be gate's.
    with device_of(gate):
        _act_record_kernel[grid](
            gate, up, culture, keep, set_ids,
            h,
            K, S, Q,
            R, N, C, num_sets, float(factor),
            gate.stride(0), up.stride(0), h.stride(0),
            keep.stride(0) if do_ablate else 0, keep.stride(1) if do_ablate else 0,
            ACT_FN=ACT_IDS[act_fn],
            RECORD_POST=activation == "post",
            DO_RECORD=bool(do_record),
            DO_ABLATE=bool(do_ablate),
            STEER=bool(do_ablate) and factor != 0.0,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )  # fmt: skip
    return h
