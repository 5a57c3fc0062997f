"""topk.py: both backends against a plain-Python reference, and against each other.

The reference sorts (−value, index) pairs with Python's sort, so it shares no code with either
backend. Every comparison is exact equality of int64 indices (selection copies values, it
computes nothing, so there is no tolerance to allow).
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.selection import topk

HAS_CPP = topk._cpp() is not None
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason="culture_neurons._C not built (python setup.py build_ext --inplace)"
)
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


# -- references -----------------------------------------------------------------------------------
def ref_topk(x: torch.Tensor, k: int) -> list[int]:
    vals = x.reshape(-1).double().tolist()
    order = sorted(
        (i for i, v in enumerate(vals) if not math.isnan(v)), key=lambda i: (-vals[i], i)
    )
    return order[:k]


def ref_kth(x: torch.Tensor, k: int) -> float:
    vals = sorted(v for v in x.reshape(-1).double().tolist() if not math.isnan(v))
    return vals[k - 1]


def awkward_arrays() -> dict[str, torch.Tensor]:
    """Ties, NaN, ±inf, ±0, all-equal, tiny and 7x33 shapes."""
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 5, (231,), generator=g).double()
    with_nan = torch.randn(200, generator=g)
    with_nan[torch.randint(0, 200, (40,), generator=g)] = torch.nan
    inf = torch.tensor([1.0, -torch.inf, torch.inf, torch.nan, -torch.inf, 0.0, torch.inf, -0.0])
    return {
        "ties": ties,
        "nan": with_nan,
        "inf": inf,
        "all_equal": torch.full((50,), 3.5),
        "all_nan": torch.full((5,), torch.nan),
        "one": torch.tensor([2.0]),
        "empty": torch.zeros(0),
        "7x33": torch.randint(-3, 3, (7, 33), generator=g).float(),
        "zeros_signed": torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0]),
    }


# -- top-k ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(awkward_arrays()))
def test_topk_matches_reference(name, backend):
    x = awkward_arrays()[name]
    n = x.numel()
    for k in sorted({0, 1, 2, 3, n // 2, max(n - 1, 0), n, n + 5}):
        got = topk.topk_indices(x, k, backend=backend)
        assert got.dtype == torch.int64
        assert got.tolist() == ref_topk(x, k), (name, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16])
def test_topk_dtypes(dtype, backend):
    x = torch.tensor([3, 1, 3, 2, 1, 3]).to(dtype)
    assert topk.topk_indices(x, 4, backend=backend).tolist() == [0, 2, 5, 3]


def test_topk_rejects_bad_input():
    with pytest.raises(UsageError, match="k must be >= 0"):
        topk.topk_indices(torch.ones(3), -1)
    with pytest.raises(UsageError, match="torch.Tensor"):
        topk.topk_indices([1.0, 2.0], 1)
    with pytest.raises(UsageError, match="k must be an int"):
        topk.topk_indices(torch.ones(3), 1.5)
    with pytest.raises(UsageError, match="backend"):
        topk.topk_indices(torch.ones(3), 1, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_rows_and_groups(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (13, 67), generator=g).double()
    x[3, ::2] = torch.nan
    indptr, index = topk.topk_rows(x, 9, backend=backend)
    for r in range(13):
        assert index[indptr[r] : indptr[r + 1]].tolist() == ref_topk(x[r], 9)

    flat = x.reshape(-1)
    groups = torch.randint(-1, 5, (flat.numel(),), generator=g)  # -1 = in no group
    indptr, index = topk.topk_groups(flat, groups, 6, 7, backend=backend)
    for grp in range(6):
        members = torch.nonzero(groups == grp).squeeze(1)
        want = members[ref_topk(flat[members], 7)].tolist()
        assert index[indptr[grp] : indptr[grp + 1]].tolist() == want, grp
    with pytest.raises(UsageError, match="not below num_groups"):
        topk.topk_groups(flat, groups, 3, 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top2(backend):
    X = torch.tensor(
        [[1.0, 5.0, 2.0, -torch.inf, 0.0],
         [3.0, 5.0, 2.0, -torch.inf, 7.0],
         [2.0, 4.0, 9.0, -torch.inf, 7.0]]
    )  # fmt: skip
    first, arg, second = topk.top2(X, backend=backend)
    assert first.tolist() == [3.0, 5.0, 9.0, -math.inf, 7.0]
    assert arg.tolist() == [1, 0, 2, 0, 1]  # first row on ties
    assert second.tolist() == [2.0, 5.0, 2.0, -math.inf, 7.0]  # a shared maximum counts twice


# -- k-th value -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(awkward_arrays()))
def test_kth_value_matches_reference(name, backend):
    x = awkward_arrays()[name]
    m = int((~torch.isnan(x)).sum())
    for k in sorted({1, 2, m // 2, m - 1, m}):
        if 1 <= k <= m:
            assert topk.kth_value(x, k, backend=backend) == ref_kth(x, k), (name, k)
    with pytest.raises(UsageError, match="out of range"):
        topk.kth_value(x, m + 1, backend=backend)
    with pytest.raises(UsageError):
        topk.kth_value(x, 0, backend=backend)


# -- the C++ extension itself, with forced thread counts ------------------------------------------
@functools.lru_cache(maxsize=1)
def merge_case():
    """1.5 M values with heavy ties and NaN, and the torch answers (computed once)."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2000, 1_500_000).astype(np.float64)
    x[rng.integers(0, x.size, 10_000)] = np.nan
    tops = {k: topk._topk_torch(torch.from_numpy(x), k).numpy() for k in (1, 777, 40_000)}
    return x, tops, np.sort(x[~np.isnan(x)])


@needs_cpp
@pytest.mark.parametrize("threads", [1, 3, 4])
def test_cpp_threads_merge(threads):
    """Per-thread candidate buffers must merge to the same answer for any thread count."""
    x, tops, valid = merge_case()
    for k, want in tops.items():
        assert np.array_equal(topk._cpp().topk(x, k, threads), want), k
    for k in (1, 12_345, valid.size // 2, valid.size - 3, valid.size):
        assert topk._cpp().kth_value(x, k, threads) == valid[k - 1], k


@needs_cpp
def test_cpp_kth_adversarial_order():
    """Sorted input and a sample that misses the answer still give the exact value."""
    x = np.arange(1_000_000, dtype=np.float32)
    assert topk._cpp().kth_value(x, 500_001, 4) == 500_000.0
    # The strided sample (every 15th value here) sees only zeros, 1/15 of the data: a middle k
    # misses the bracket and takes the exact fallback; a small k hits the lo == hi shortcut.
    y = np.ones(1_000_000)
    y[::15] = 0.0
    zeros = (y == 0).sum()
    assert topk._cpp().kth_value(y, 500_000, 4) == 1.0
    assert topk._cpp().kth_value(y, 1000, 4) == 0.0
    assert topk._cpp().kth_value(y, int(zeros), 4) == 0.0
    assert topk._cpp().kth_value(y, int(zeros) + 1, 4) == 1.0


@needs_cpp
def test_cpp_rejects_bad_dtype():
    with pytest.raises(TypeError, match="float32 or float64"):
        topk._cpp().topk(np.arange(5), 2)


@pytest.mark.slow
def test_past_2_pow_24():
    """One float32 array of 2^24 + 3001 values with ties, NaN and ±inf: the torch path works
    (torch.quantile would refuse it) and, where built, the C++ path gives identical answers."""
    n = (1 << 24) + 3001
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 100_000, (n,), generator=g).float()
    x[torch.randint(0, n, (5000,), generator=g)] = torch.nan
    x[-1], x[-2], x[7] = torch.inf, -torch.inf, torch.inf
    for k in (1, 5000):
        got = topk.topk_indices(x, k, backend="torch")
        assert got[0] == 7 and (k == 1 or got[1] == n - 1)  # +inf first, the two by index
        assert bool((x[got[1:]] <= x[got[:-1]]).all())
        if HAS_CPP:
            assert torch.equal(topk.topk_indices(x, k, backend="cpp"), got), k
    valid = x[~torch.isnan(x)]
    k = round(valid.numel() * 0.95)
    want = float(np.partition(valid.numpy(), k - 1)[k - 1])
    assert topk.kth_value(x, k, backend="torch") == want
    if HAS_CPP:
        assert topk.kth_value(x, k, backend="cpp") == want


# -- fallback ---------------------------------------------------------------------------------------
@pytest.fixture
def no_extension(monkeypatch):
    """The extension as if it had not been built (the warning's cache cleared around it)."""
    monkeypatch.setattr(topk, "_extension", lambda: (None, "ImportError: pretend"))
    topk._warn_fallback.cache_clear()
    yield
    topk._warn_fallback.cache_clear()


def test_fallback_warns_once(no_extension):
    assert topk.BACKEND == "torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        topk.topk_indices(torch.ones(3), 1)
        topk.topk_indices(torch.ones(3), 1)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "pretend" in msgs[0]


def test_cpp_missing_is_a_usage_error(no_extension):
    with pytest.raises(UsageError, match="build it"):
        topk.topk_indices(torch.ones(3), 1, backend="cpp")


def test_importing_the_package_does_not_load_the_extension():
    """_C loads on first use: a fresh interpreter imports culture_neurons without it."""
    code = ("import sys, culture_neurons; "
            "assert 'culture_neurons._C' not in sys.modules, 'loaded at import'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
