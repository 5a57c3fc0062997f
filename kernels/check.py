"""How a path is compared with another: the tolerances, ``first_mismatch`` and the self-check.

One home for the comparison rules that the dispatcher's self-check (:func:`self_check`), the
kernel tests (``tests/conftest.py``) and ``bench/gpu_check.py`` share.

Tolerances: counts exactly. ``h`` (:data:`H_RTOL`): the kernel computes ``act`` as
``g / (1 + exp(-z))`` with the GPU's fast exp, torch as ``g * sigmoid(g)`` or
``0.5 g (1 + tanh z)``: a few fp32 ulp apart, ~1e-6 relative, so fp32 ``h`` agrees to 1e-5; a
half-precision ``h`` may then round to the neighbouring value: one ulp of its dtype, two eps
relative. Sums: fp32 sums of <= R terms in another order (and a fast exp): the self-check allows
1e-4 of the largest sum.
"""

from __future__ import annotations

import torch

from . import dispatch, torch_path
from .args import OpArgs

H_RTOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one ulp


def first_mismatch(got: torch.Tensor, want: torch.Tensor, atol: float = 0.0, rtol: float = 0.0,
                   dims: tuple[str, ...] | None = None,
                   names: tuple[str, str] = ("got", "want")) -> str | None:  # fmt: skip
    """None when ``got`` and ``want`` agree within ``atol + rtol * |want|`` (NaN only against
    NaN), else a line: how many differ and the first index, named by ``dims`` when given
    (``("culture", "neuron")`` for K, S, Q; ``("row", "neuron")`` for h)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ((got - want).abs() > atol + rtol * want.abs()) | (got.isnan() != want.isnan())
    if not bad.any():
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    where = str(idx)
    if dims:
        where = "(" + ", ".join(f"{d} {i}" for d, i in zip(dims, idx, strict=True)) + ")"
    return (f"{int(bad.sum())} of {bad.numel()} values; first at {where}: "
            f"{names[0]} {got[idx].item():.9g}, {names[1]} {want[idx].item():.9g} "
            f"(atol {atol:.3g}, rtol {rtol:g})")


def self_check(device: torch.device, dtype: torch.dtype, variant: tuple) -> str | None:
    """Run small cases through the Triton kernel and the PyTorch path on ``device``: None when
    they agree, else the first difference in words (see :mod:`.dispatch`).

    Two shapes, because Triton compiles one kernel per alignment of sizes and strides: 2 x 2
    production tiles of aligned columns (N and the row stride multiples of 16, as at 7B
    widths) with a ragged last row tile, and 2 x 2 tiles of ragged, unaligned columns. Rows:
    a first row tile of one culture with skipped rows, then runs of 5 rows with ids -1..C-1 and
    gaps between them; per-row ablation sets (or steering); gate / up as column slices of one
    ``[R, 2N]`` buffer (a fused gate_up projection's row stride). Gate lies in [-4.5, 4.5],
    clear of the band where fp32 GELU-tanh rounds to 0 and two correct exps may split one ulp.
    """
    tile = dispatch.triton_kernels().tile_for(device)
    shapes = [(2 * tile.block_r - 3, 2 * tile.block_n), (2 * tile.block_r, tile.block_n + 7)]
    for R, N in shapes:
        difference = _check_case(device, dtype, variant, R, N, tile.block_r)
        if difference:
            return f"{R} x {N}: {difference}"
    return None


def _check_case(device, dtype, variant, R: int, N: int, block_r: int) -> str | None:
    act_fn, activation, do_record, do_ablate, steer = variant
    kernel = dispatch.triton_kernels()
    C, num_sets = 5, 3
    gen = torch.Generator().manual_seed(R * N)
    gate_up = (torch.rand(R, 2 * N, generator=gen) * 9 - 4.5).to(dtype).to(device)
    rows = torch.arange(R)
    culture = (rows // 5 * 3) % (C + 1) - 1
    culture[:block_r] = torch.where(culture[:block_r] >= 0, 2, -1)
    set_ids = ((rows // 3) % (num_sets + 1) - 1).to(torch.int32).to(device)
    keep = (torch.rand(num_sets, N, generator=gen) > 0.3).to(torch.uint8).to(device)
    results = []
    for path in ("kernel", "torch"):
        K = torch.zeros(C, N, dtype=torch.int64, device=device)
        S = torch.zeros(C, N, dtype=torch.float64, device=device)
        Q = torch.zeros(C, N, dtype=torch.float64, device=device)
        args = OpArgs(gate_up[:, :N], gate_up[:, N:], culture.to(torch.int32).to(device), K, S,
                      Q, keep, set_ids, act_fn, activation, do_record, do_ablate,
                      1.5 if steer else 0.0)  # fmt: skip
        h = kernel.launch(kernel.prepare(args)) if path == "kernel" else torch_path.run(args)
        results.append([t.cpu().double() for t in (h, K, S, Q)])
    (h_k, K_k, S_k, Q_k), (h_t, K_t, S_t, Q_t) = results
    checks = [("h", h_k, h_t, H_RTOL[dtype], 1e-6)]
    if do_record:
        checks += [("K", K_k, K_t, 0.0, 0.0),
                   ("S", S_k, S_t, 1e-4, 1e-4 * float(S_t.abs().max()) + 1e-6),
                   ("Q", Q_k, Q_t, 1e-4, 1e-4 * float(Q_t.abs().max()) + 1e-6)]  # fmt: skip
    for name, got, want, rtol, atol in checks:
        dims = ("row", "neuron") if name == "h" else ("culture", "neuron")
        difference = first_mismatch(got, want, atol, rtol, dims, names=("kernel", "PyTorch"))
        if difference:
            return f"{name} differs in {difference}"
    return None
