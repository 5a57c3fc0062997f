"""The masked down-proj GEMM (CPU interpreter here, CUDA where marked gpu) against the fp64
reference ``(h * keep[set_ids]) @ W^T``."""

import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import masked_down  # noqa: E402  (bench/masked_down.py)
from masked_down import masked_down_reference  # noqa: E402

# Tolerance: fp32 accumulation over N <= 67 products in another order than fp64 (~1e-6
# relative), then the output is rounded to the input dtype (half an ulp: eps / 2 relative, eps
# at fp16 2^-10, bf16 2^-7); outputs are ~N(0, 1) (W scaled by 1/sqrt(N)), so atol 1e-5 only
# covers outputs near zero, where the relative bound says nothing.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _case(R, N, H, num_sets, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(R, N, generator=gen).to(dtype)
    weight = (torch.randn(H, N, generator=gen) / N**0.5).to(dtype)
    keep = torch.rand(num_sets, N, generator=gen) > 0.3
    set_ids = torch.randint(-1, num_sets, (R,), generator=gen, dtype=torch.int32)
    return h, weight, keep, set_ids


@pytest.mark.parametrize("R,N,H", [(1, 1, 1), (7, 33, 5), (130, 67, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_against_reference(R, N, H, dtype, device, assert_close_stats):
    h, weight, keep, set_ids = _case(R, N, H, 3, dtype, seed=R + N)
    # Small tiles: several row, column and K tiles with masked edges on tiny shapes.
    run = functools.partial(masked_down.masked_down_triton, block_m=16, block_h=16, block_k=16)
    out = run(*(t.to(device) for t in (h, weight, keep, set_ids)))
    want = masked_down_reference(h, weight, keep, set_ids)
    assert out.shape == (R, H) and out.dtype == dtype
    assert_close_stats("out", out, want, atol=1e-5, rtol=RTOL[dtype])


def test_no_ablation_is_plain_linear(device, assert_close_stats):
    h, weight, keep, set_ids = _case(20, 33, 17, 2, torch.float32, seed=1)
    out = masked_down.masked_down_triton(*(t.to(device) for t in (h, weight, keep, set_ids)),
                                         do_ablate=False)
    assert_close_stats("out", out, h.double() @ weight.double().T, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("R,N,H", [(1, 1, 1), (130, 67, 40), (257, 4099, 1031)])
def test_cuda_bf16(R, N, H, assert_close_stats):
    h, weight, keep, set_ids = _case(R, N, H, 3, torch.bfloat16, seed=R)
    out = masked_down.masked_down_triton(h.cuda(), weight.cuda(), keep.cuda(), set_ids.cuda())
    want = masked_down_reference(h, weight, keep, set_ids)
    assert_close_stats("out", out, want, atol=1e-2, rtol=2.0**-7)
