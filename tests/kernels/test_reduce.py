"""The one reduction against a loop written here: every chunk size and input dtype gives the
same counts exactly, sums to fp32 rounding, and ablation zeroes exactly each row's set; the
C++ CPU path (``reduce.NATIVE``, csrc/accumulate.cpp) adds the PyTorch path's totals bit for bit."""

from __future__ import annotations

import pytest
import torch

from culture_neurons.kernels import reduce

needs_native = pytest.mark.skipif(
    reduce.NATIVE is None,
    reason="culture_neurons.kernels._accumulate not built (python setup.py build_ext --inplace)",
)
PATHS = ["torch", pytest.param("native", marks=needs_native)]


@pytest.fixture
def path(request, monkeypatch):
    """``torch``: the PyTorch path only (the extension hidden); ``native``: the C++ one."""
    if request.param == "torch":
        monkeypatch.setattr(reduce, "NATIVE", None)
    return request.param


def loop_reference(a: torch.Tensor, culture: torch.Tensor, C: int):
    """K int64, S, Q fp64 [C, N] row by row, in fp64 from a's own values."""
    N = a.shape[1]
    K = torch.zeros(C, N, dtype=torch.int64)
    S = torch.zeros(C, N, dtype=torch.float64)
    Q = torch.zeros(C, N, dtype=torch.float64)
    for r in range(a.shape[0]):
        c = int(culture[r])
        if 0 <= c < C:
            x = a[r].double()
            K[c] += (x > 0).long()
            S[c] += x
            Q[c] += x * x
    return K, S, Q


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("R,N", [(1, 1), (130, 67), (7, 33)])
def test_accumulate_matches_a_loop_for_every_chunk_and_dtype(path, dtype, chunk, R, N):
    gen = torch.Generator().manual_seed(R * N)
    a = (torch.randn(R, N, generator=gen) * 3).to(dtype)  # both signs, never all zero
    culture = torch.randint(-1, 6, (R,), generator=gen)  # 5 = C: out of range, not counted
    C = 5
    K0 = torch.randint(0, 9, (C, N))
    S0, Q0 = torch.randn(C, N, dtype=torch.float64), torch.rand(C, N, dtype=torch.float64)
    K, S, Q = K0.clone(), S0.clone(), Q0.clone()
    reduce.accumulate(K, S, Q, a, culture, chunk_rows=chunk)
    Kr, Sr, Qr = loop_reference(a, culture, C)
    assert torch.equal(K - K0, Kr), "counts must be exact"
    # fp32 sums of <= 130 values (exact in fp32: they come from a bf16/fp16/fp32 tensor):
    # <= 130 * 2^-24 relative to sum |a|, below 1e-5 of the largest |S|.
    torch.testing.assert_close(S - S0, Sr, rtol=1e-5, atol=1e-5 * float(Sr.abs().max()) + 1e-9)
    torch.testing.assert_close(Q - Q0, Qr, rtol=1e-5, atol=1e-5 * float(Qr.max()) + 1e-9)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("R,N,C,chunk", [(248, 96, 25, None), (1000, 77, 5, 128),
                                         (3000, 300, 3, None), (513, 64, 7, 100), (5, 3, 1, 1)])
def test_native_path_adds_the_torch_paths_totals_bit_for_bit(dtype, id_dtype, R, N, C, chunk):
    """Same fp32 sums in the same row order, the same folds: identical totals, so a run's
    statistics do not depend on whether the extension was built (or on the machine's compiler
    contracting a * a + q into one rounding: it is built with -ffp-contract=off)."""
    gen = torch.Generator().manual_seed(R + N + C)
    a = (torch.randn(R, N, generator=gen) * 3).to(dtype)
    a[::11, ::5] = 0.0  # zeros are not firing
    culture = torch.randint(-1, C + 2, (R,), generator=gen).to(id_dtype)  # -1, >= C: uncounted
    start = (torch.randint(0, 9, (C, N), generator=gen), torch.randn(C, N, dtype=torch.float64,
             generator=gen), torch.rand(C, N, dtype=torch.float64, generator=gen))  # fmt: skip
    native = [t.clone() for t in start]
    for _ in range(2):  # totals that already hold a forward's
        reduce.accumulate(*native, a, culture, chunk_rows=chunk)
    torch_path = [t.clone() for t in start]
    saved, reduce.NATIVE = reduce.NATIVE, None
    try:
        for _ in range(2):
            reduce.accumulate(*torch_path, a, culture, chunk_rows=chunk)
    finally:
        reduce.NATIVE = saved
    for name, mine, theirs in zip("KSQ", native, torch_path, strict=True):
        assert torch.equal(mine, theirs), f"{name} differs from the PyTorch path's"
        if name != "K":  # bit for bit, not only ==: the fp64 totals' every bit
            assert torch.equal(mine.view(torch.int64), theirs.view(torch.int64))


def test_native_path_is_taken_only_where_it_can_read_the_tensors():
    """Non-contiguous totals, fp16 rows or float ids go the PyTorch way (same numbers)."""
    C, N = 3, 8
    K, S, Q = torch.zeros(C, N, dtype=torch.int64), torch.zeros(C, N, dtype=torch.float64), \
        torch.zeros(C, N, dtype=torch.float64)  # fmt: skip
    a, ids = torch.randn(10, N), torch.randint(-1, C, (10,))
    assert reduce._native(K, S, Q, a, ids) == (reduce.NATIVE is not None)
    assert not reduce._native(K, S, Q, a.half(), ids)
    assert not reduce._native(K, S, Q, a, ids.float())
    assert not reduce._native(K, S, Q, a, torch.randint(-1, C, (20,))[::2])  # strided ids
    wide = torch.zeros(C, 2 * N, dtype=torch.float64)[:, ::2]
    assert not reduce._native(K, wide, Q, a, ids)


@pytest.mark.parametrize("rows", ["fp32", "bf16", "fp16", "strided", "int16 ids"])
def test_layer_sums_add_what_accumulate_adds_bit_for_bit(rows):
    """``LayerSums.add`` (the totals checked once, the path every recorded layer takes) gives
    ``accumulate``'s totals, through the C++ call where it can read the rows and through
    ``accumulate`` itself where it cannot (fp16, strided rows, int16 ids)."""
    gen = torch.Generator().manual_seed(7)
    C, N, R = 6, 45, 300
    a = torch.randn(R, 2 * N if rows == "strided" else N, generator=gen)
    a = {"bf16": a.bfloat16(), "fp16": a.half(), "strided": a[:, ::2]}.get(rows, a)
    ids = torch.randint(-1, C + 1, (R,), generator=gen, dtype=torch.int32)
    ids = ids.to(torch.int16) if rows == "int16 ids" else ids
    start = (torch.randint(0, 9, (C, N), generator=gen), torch.randn(C, N, dtype=torch.float64,
             generator=gen), torch.rand(C, N, dtype=torch.float64, generator=gen))  # fmt: skip
    bound = reduce.LayerSums(*(t.clone() for t in start))
    plain = [t.clone() for t in start]
    for _ in range(2):
        bound.add(a, ids)
        reduce.accumulate(*plain, a, ids)
    for name, mine, theirs in zip("KSQ", bound, plain, strict=True):
        assert torch.equal(mine.view(torch.int64), theirs.view(torch.int64)), name


def test_layer_sums_on_totals_the_extension_cannot_read_take_the_pytorch_path(monkeypatch):
    C, N = 3, 8
    wide = torch.zeros(C, 2 * N, dtype=torch.float64)[:, ::2]
    K, Q = torch.zeros(C, N, dtype=torch.int64), torch.zeros(C, N, dtype=torch.float64)
    assert not reduce.LayerSums(K, wide, Q).native
    assert reduce.LayerSums(K, wide.contiguous(), Q).native == (reduce.NATIVE is not None)
    calls = []
    monkeypatch.setattr(reduce, "accumulate", lambda *args: calls.append(args))
    reduce.LayerSums(K, wide, Q).add(torch.randn(4, N), torch.zeros(4, dtype=torch.int64))
    assert len(calls) == 1 and calls[0][1] is wide


def test_row_slots_made_once_follow_every_change_of_the_ids():
    """Each layer passes the same culture tensor: its slots are reused, but never after an
    in-place write, for another C, or for an inference tensor (no version counter)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(40, 9, generator=gen)
    culture = torch.randint(-1, 4, (40,), generator=gen)

    def check(C, ids):
        K, S, Q = (torch.zeros(C, 9, dtype=d) for d in (torch.int64, torch.float64, torch.float64))
        reduce.accumulate(K, S, Q, a, ids, chunk_rows=16)
        Kr, Sr, _ = loop_reference(a, ids, C)
        assert torch.equal(K, Kr)
        torch.testing.assert_close(S, Sr, rtol=1e-5, atol=1e-5)  # fp32 sums of <= 40 values

    check(4, culture)
    check(4, culture)  # reused
    culture[::3] = 3 - culture[::3]  # in place: the version counter moves
    check(4, culture)
    check(2, culture)  # ids 2 and 3 now out of range
    with torch.inference_mode():
        frozen = culture.clone()
        check(4, frozen)
        frozen[:20] = -1
        check(4, frozen)


def test_chunks_are_bounded_by_bytes_on_the_cpu():
    for N in (1, 96, 4736, 18944, 10**7):
        rows = reduce.chunk_rows_for(torch.empty(0, N))
        assert 64 <= rows <= reduce.CHUNK_ROWS
        assert rows == 64 or rows * N * 4 <= reduce.CPU_CHUNK_BYTES


def test_accumulate_allocates_one_chunk_temporary(monkeypatch):
    """Whatever R and a's dtype, the only [rows, N] allocation is one [chunk, N] fp32 buffer
    (the PyTorch path, which the profiler sees; the C++ path holds three [C, N] fp32 sums and
    one row)."""
    monkeypatch.setattr(reduce, "NATIVE", None)
    from culture_neurons.testing.memory import peak_bytes

    R, N, C, chunk = 4096, 256, 25, 64
    K = torch.zeros(C, N, dtype=torch.int64)
    S, Q = torch.zeros(C, N, dtype=torch.float64), torch.zeros(C, N, dtype=torch.float64)
    culture = torch.randint(-1, C, (R,))
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(R, N).to(dtype)
        peak = peak_bytes(lambda a=a: reduce.accumulate(K, S, Q, a, culture, chunk_rows=chunk))
        sums = 3 * (C + 1) * N * 4 + C * N * 8  # [3, C + 1, N] fp32 and the int64 count fold
        ids = 4 * R * 8  # the rows' int64 slots, made once for all layers, and their masks
        assert peak <= chunk * N * 4 + sums + ids, f"{dtype}: {peak} bytes"
        assert peak < R * N * 4 / 8, "nothing of the size of the rows may be allocated"


def ablate_reference(a, keep, set_ids, factor):
    out = a.clone()
    for r in range(a.shape[0]):
        s = int(set_ids[r])
        if 0 <= s < keep.shape[0]:
            for n in range(a.shape[1]):
                if keep[s, n] == 0:
                    out[r, n] = out[r, n] * factor if factor else 0
    return out


@pytest.mark.parametrize("factor", [0.0, 1.5])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_ablate_matches_a_loop(factor, chunk):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(23, 17, generator=gen) + 0.1
    keep = (torch.rand(4, 17, generator=gen) > 0.4).to(torch.uint8)
    set_ids = torch.randint(-1, 6, (23,), generator=gen)  # 4, 5: outside [0, S), no ablation
    want = ablate_reference(a, keep, set_ids, factor)
    got = reduce.ablate_(a.clone(), keep, set_ids, factor, chunk_rows=chunk)
    assert torch.equal(got, want)
    assert torch.equal(reduce.ablate(a, keep, set_ids, factor), want)
