"""Masked down projection: down_proj with per-row ablation applied as the A tile is loaded (Triton).

Symbols: R rows, N neurons (intermediate size), H hidden size, num_sets ablation sets.

    out[r, :] = (h[r, :] * m[r, :]) @ W^T,   m[r, j] = keep[set_ids[r], j]  (1 where set_ids = -1)

with ``W [H, N]`` the ``nn.Linear`` weight of down_proj (bias-free), fp32 accumulation.
Kept in bench/, not in the package: the fused op already zeroes ``h`` as it computes it, so
masking again in the GEMM saves nothing on the package's paths (ablation is "fused kernel
zeroes h, then cuBLAS down_proj"). It would only pay for a caller that ablates a precomputed
``h`` without the fused op; bench/gpu_check.py measures it against cuBLAS, so that question
has numbers if it is ever asked. ``tests/test_bench_masked_down.py`` checks it against
:func:`masked_down_reference` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from culture_neurons.kernels.act_record import device_of
from culture_neurons.kernels.dispatch import interpreting
from culture_neurons.kernels.ops import FLOAT_DTYPES
from culture_neurons.kernels.reference import keep_rows_reference

from culture_neurons.errors import UsageError

# Standard Hopper/Ampere GEMM tile (128 x 128 x 64, 8 warps, 3 stages); not yet tuned.
BLOCK_M_GPU, BLOCK_H_GPU, BLOCK_K_GPU, GROUP_M, NUM_WARPS_GPU, NUM_STAGES_GPU = (
    128, 128, 64, 8, 8, 3)


@triton.jit
def _masked_down_kernel(
    # inputs
    h_ptr,  # [R, N] fp32/fp16/bf16
    w_ptr,  # [H, N] same dtype as h
    keep_ptr,  # [num_sets, N] uint8/float, nonzero = keep (read only if DO_ABLATE)
    set_ids_ptr,  # [R] int32, -1 = no ablation (read only if DO_ABLATE)
    # outputs
    out_ptr,  # [R, H] same dtype as h
    # sizes
    R,
    H,
    N,
    num_sets,
    # strides
    stride_h_r,
    stride_h_n,
    stride_w_h,
    stride_w_n,
    stride_keep_s,
    stride_keep_n,
    stride_out_r,
    stride_out_h,
    # constexprs
    DO_ABLATE: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 inputs, or the interpreter (its half-precision dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(R, BLOCK_M)
    num_h = tl.cdiv(H, BLOCK_H)
    group_size = GROUP_M * num_h
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_h = (pid % group_size) // rows_in_group

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: R * N may pass 2^31
    outs = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < R
    out_ok = outs < H
    if DO_ABLATE:
        set_ids = tl.load(set_ids_ptr + rows, mask=row_ok, other=-1)
        ablated_row = (set_ids >= 0) & (set_ids < num_sets)
        keep_row_offs = set_ids.to(tl.int64) * stride_keep_s

    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        a_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(h_ptr + rows[:, None] * stride_h_r + ks[None, :] * stride_h_n, mask=a_ok,
                    other=0.0)
        if DO_ABLATE:
            keep = tl.load(keep_ptr + keep_row_offs[:, None] + ks[None, :] * stride_keep_n,
                           mask=a_ok & ablated_row[:, None], other=1)
            a = tl.where(keep != 0, a, tl.zeros_like(a))
        # W^T tile [BLOCK_K, BLOCK_H] read straight from W [H, N].
        b = tl.load(w_ptr + ks[:, None] * stride_w_n + outs[None, :] * stride_w_h,
                    mask=k_ok[:, None] & out_ok[None, :], other=0.0)
        if DOT_FP32:
            # "ieee": fp32 inputs get fp32 products, as cuBLAS by default (no TF32).
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    out_offs = rows[:, None] * stride_out_r + outs[None, :] * stride_out_h
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


def masked_down_triton(
    h: torch.Tensor,  # [R, N]
    weight: torch.Tensor,  # [H, N]
    keep: torch.Tensor,  # [num_sets, N], nonzero = keep
    set_ids: torch.Tensor,  # [R] int32 (any int is converted), -1 = no ablation
    *,
    do_ablate: bool = True,
    block_m: int | None = None,
    block_h: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Launch the masked GEMM; returns ``out [R, H]`` in h's dtype. See the module docstring."""
    # check
    check_masked_down_args(h, weight, keep, set_ids)
    if set_ids.dtype != torch.int32:
        set_ids = set_ids.to(torch.int32)
    if keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)  # same bytes; triton loads uint8 everywhere
    R, N = h.shape
    H = weight.shape[0]

    # allocate
    out = torch.empty((R, H), dtype=h.dtype, device=h.device)
    if R == 0 or H == 0:
        return out
    if N == 0:
        return out.zero_()

    # launch
    interp = interpreting()
    block_m = block_m or (16 if interp else BLOCK_M_GPU)
    block_h = block_h or (16 if interp else BLOCK_H_GPU)
    # fp32 tiles take twice the shared memory: 3 stages of 128 x 64 fp32 A and B tiles would
    # need 192 KiB, past an A100's 164 KiB.
    block_k = block_k or (16 if interp else BLOCK_K_GPU // (2 if h.dtype == torch.float32 else 1))
    grid = (triton.cdiv(R, block_m) * triton.cdiv(H, block_h),)
    with device_of(h):  # Triton launches on the current device, which need not be h's
        _masked_down_kernel[grid](
            h, weight, keep, set_ids,
            out,
            R, H, N, keep.shape[0],
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            keep.stride(0), keep.stride(1), out.stride(0), out.stride(1),
            DO_ABLATE=bool(do_ablate),
            DOT_FP32=interp or h.dtype == torch.float32,
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            BLOCK_K=block_k,
            GROUP_M=GROUP_M,
            num_warps=NUM_WARPS_GPU,
            num_stages=NUM_STAGES_GPU,
        )  # fmt: skip
    return out


def check_masked_down_args(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                           set_ids: torch.Tensor) -> None:
    """Raise ``UsageError`` naming the first inconsistent argument of ``masked_down_proj``."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise UsageError(f"masked_down: need h [R, N] and weight [H, N], given "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}; pass down_proj.weight")
    if h.dtype not in FLOAT_DTYPES or weight.dtype != h.dtype:
        raise UsageError(f"masked_down: h and weight must share a float dtype, given "
                         f"{h.dtype} and {weight.dtype}; cast one of them")
    if keep.dim() != 2 or keep.shape[1] != h.shape[1]:
        raise UsageError(f"masked_down: keep must be [num_sets, N={h.shape[1]}], given "
                         f"{tuple(keep.shape)}")
    if set_ids.shape != (h.shape[0],) or set_ids.dtype not in (torch.int32, torch.int64):
        raise UsageError(f"masked_down: set_ids must be [R={h.shape[0]}] int32/int64, "
                         f"given {tuple(set_ids.shape)} {set_ids.dtype}; -1 = no ablation")
    for name, t in (("weight", weight), ("keep", keep), ("set_ids", set_ids)):
        if t.device != h.device:
            raise UsageError(f"masked_down: {name} on {t.device}, h on {h.device}; "
                             "move them to one device")


def masked_down_reference(
    h: torch.Tensor,  # [R, N]
    weight: torch.Tensor,  # [H, N], nn.Linear weight of down_proj
    keep: torch.Tensor | None = None,  # [num_sets, N], nonzero = keep
    set_ids: torch.Tensor | None = None,  # [R] int, -1 = no ablation
) -> torch.Tensor:
    """``out [R, H] = (h * keep[set_ids]) @ W^T`` in fp64."""
    R, N = h.shape
    mask = keep_rows_reference(keep, set_ids, R, N)
    return (h.cpu().double() * mask) @ weight.cpu().double().T


def masked_down_proj(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                     set_ids: torch.Tensor) -> torch.Tensor:
    """``out [..., H] = (h * keep[set_ids]) @ weight^T``: the Triton GEMM on CUDA, else
    ``F.linear(h * mask, weight)`` (what gpu_check --quick runs on a CPU)."""
    shape = h.shape
    h2, rs = h.reshape(-1, shape[-1]), set_ids.reshape(-1)
    check_masked_down_args(h2, weight, keep, rs)
    if h.is_cuda:
        out = masked_down_triton(h2, weight, keep, rs)
    else:
        valid = (rs >= 0) & (rs < keep.shape[0])
        mask = torch.where(valid[:, None], keep[rs.clamp(0, keep.shape[0] - 1).long()] != 0, True)
        out = torch.nn.functional.linear(h2 * mask.to(h2.dtype), weight)
    return out.reshape(*shape[:-1], weight.shape[0])
