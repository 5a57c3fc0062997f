"""Exact top-k and order statistics with deterministic ties: the ranking core of the selectors.

Two backends with one contract:

- ``"cpp"``: ``culture_neurons._C`` (``csrc/select.cpp``), multi-threaded linear-time selection
  (per-thread candidate buffers + ``nth_element``, then a merge), GIL released;
- ``"torch"``: the pure-PyTorch twin below (``torch.topk`` plus tie fixing, ``torch.kthvalue``),
  used when the extension is not built and in every test as the reference.

Functions: :func:`topk_indices` (one array), :func:`topk_rows` (every row of [R, n]),
:func:`topk_groups` (every group of a labelled flat array), :func:`kth_value`, and the
per-column :func:`top2` (largest, argmax, second largest) that the contrast selectors need.

``BACKEND`` says which one a call without ``backend=`` uses; it is ``"torch"`` (with one warning
naming the reason) when the extension does not import. The extension loads on first use, not
when this module is imported.

The contract, identical in both backends:

- ranking order: larger value first; among equal values the smaller flat index first
  (``-0.0`` and ``+0.0`` are equal, ``-inf`` and ``+inf`` are ordinary values);
- NaN is never selected by a top-k and is left out of order statistics: ``k`` counts the
  non-NaN values only, so ``kth_value(x, k)`` is ``torch.kthvalue(x[~x.isnan()], k)``;
- top-k returns ``min(k, number of non-NaN)`` int64 indices sorted by the ranking order
  (``k = 0`` gives an empty tensor);
- values are compared as float64 (float16 / bfloat16 as float32, integers as float64: exact
  below 2^53), sizes are int64, so arrays past 2^24 (and 2^31) elements work.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings

import torch

from culture_neurons.errors import UsageError

log = logging.getLogger(__name__)

BACKENDS = ("cpp", "torch")


@functools.cache
def _extension() -> tuple[object | None, str | None]:
    """(``culture_neurons._C``, None), or (None, why it does not import): not compiled at
    install time, a stale build, or a source checkout where it was never built."""
    try:
        return importlib.import_module("culture_neurons._C"), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def _cpp():
    """The loaded extension (callers resolved the backend first, so it is there)."""
    return _extension()[0]


def __getattr__(name: str):
    if name == "BACKEND":  # read lazily: importing this module never loads the extension
        return "cpp" if _extension()[0] is not None else "torch"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _warn_fallback() -> None:
    msg = (
        f"the C++ selection extension culture_neurons._C is not available ({_extension()[1]}); "
        "top-k selection uses its PyTorch twin (same sets, slower). Build it with "
        "`pip install .` or `python setup.py build_ext --inplace`."
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def topk_indices(values: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` largest non-NaN values of ``values`` (any shape, flattened).

    Args:
        values: real tensor of any shape; indices refer to ``values.reshape(-1)``.
        k: how many, ``>= 0``; more than the non-NaN count gives all non-NaN values.
        backend: ``"cpp"``, ``"torch"`` or ``None`` (= ``BACKEND``).

    Returns:
        int64 ``[min(k, #non-NaN)]`` on ``values.device``, sorted by (value desc, index asc).
    """
    values, k, backend = _check(values, k, backend, "topk_indices")
    if backend == "cpp":
        idx = _cpp().topk(_to_numpy(values), k, torch.get_num_threads())
        return torch.from_numpy(idx).to(values.device)
    return _topk_torch(values.reshape(-1), k)


def topk_rows(
    values: torch.Tensor, k: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of every row of a ``[R, n]`` tensor, as CSR.

    Returns:
        ``(indptr, index)``: int64 ``[R + 1]`` and ``[nnz]`` on CPU; row r's selection is
        ``index[indptr[r]:indptr[r + 1]]`` (column indices, same contract and order as
        :func:`topk_indices`). One call ranks all rows, in parallel on the ``"cpp"`` backend.
    """
    values, k, backend = _check(values, k, backend, "topk_rows")
    if values.dim() != 2:
        raise UsageError(f"topk_rows needs a 2-D [R, n] tensor, got shape {list(values.shape)}")
    if backend == "cpp":
        indptr, index = _cpp().topk_rows(_to_numpy(values), k, torch.get_num_threads())
        return torch.from_numpy(indptr), torch.from_numpy(index)
    return _csr([_topk_torch(row, k).cpu() for row in values])


def topk_groups(
    values: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each group of a flat array, as CSR over groups.

    Args:
        values: ``[J]`` (any shape, flattened) real values.
        groups: int64 ``[J]``, the group of each value in ``[0, num_groups)``; ``-1`` (any
            negative) = in no group, never selected (like NaN).
        num_groups: G.

    Returns:
        ``(indptr, index)``: int64 ``[G + 1]`` and ``[nnz]`` on CPU; group g's selection is
        ``index[indptr[g]:indptr[g + 1]]``, flat indices into ``values``, sorted by (value desc,
        index asc), ``min(k, non-NaN members)`` of them.
    """
    values, k, backend = _check(values, k, backend, "topk_groups")
    groups = _check_groups(groups, values, num_groups)
    if backend == "cpp":
        indptr, index = _cpp().topk_groups(
            _to_numpy(values), _to_numpy(groups), num_groups, k, torch.get_num_threads()
        )
        return torch.from_numpy(indptr), torch.from_numpy(index)
    values, groups = values.reshape(-1).cpu(), groups.reshape(-1).cpu()
    member = torch.nonzero((groups >= 0) & ~torch.isnan(values)).squeeze(1)
    by_group = torch.sort(groups[member], stable=True)  # stable: index order kept in a group
    member = member[by_group.indices]
    counts = torch.bincount(by_group.values, minlength=num_groups).tolist()
    parts = [seg[_topk_torch(values[seg], k)] for seg in torch.split(member, counts)]
    return _csr(parts)


def top2(
    values: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest value, its row and second largest value of every column of ``values`` [R, J].

    The row is the first one on ties (only a strictly larger value takes a column over); the
    second largest counts multiplicity (a shared maximum gives ``second == first``); with
    R = 1 it is ``-inf``. Meant for NaN-free data: a NaN is skipped, except in row 0, where it
    stays the column's "largest" (identically in both backends).

    Returns:
        ``(first [J], argmax int64 [J], second [J])`` on CPU; ``first``/``second`` are
        float32 for float32 / half input, float64 otherwise.
    """
    values, _, backend = _check(values, 0, backend, "top2")
    if values.dim() != 2 or values.shape[0] < 1:
        raise UsageError(f"top2 needs a 2-D [R, J] tensor with R >= 1, got {list(values.shape)}")
    if backend == "cpp":
        first, arg, second = _cpp().top2(_to_numpy(values), torch.get_num_threads())
        return torch.from_numpy(first), torch.from_numpy(arg), torch.from_numpy(second)
    return _top2_torch(values.cpu())


def kth_value(values: torch.Tensor, k: int, backend: str | None = None) -> float:
    """The ``k``-th smallest non-NaN value of ``values`` (flattened), 1-based.

    ``torch.kthvalue`` semantics on ``values[~values.isnan()]``: NaN values are left out and not
    counted, ``-inf``/``+inf`` are ordinary values. Exact (no interpolation, unlike
    ``torch.quantile``, which also refuses inputs past 2^24 elements).

    Raises:
        UsageError: ``k`` is not in ``[1, number of non-NaN values]``.
    """
    values, k, backend = _check(values, k, backend, "kth_value")
    if backend == "cpp":
        try:
            return float(_cpp().kth_value(_to_numpy(values), k, torch.get_num_threads()))
        except ValueError as e:
            raise UsageError(f"kth_value: {e}") from None
    flat = values.reshape(-1)
    nan = torch.isnan(flat)
    if nan.any():
        flat = flat[~nan]
    if not 1 <= k <= flat.numel():
        raise UsageError(
            f"kth_value: k={k} is out of range: the array has {flat.numel()} non-NaN values "
            f"(of {values.numel()}); k must be in [1, {flat.numel()}]"
        )
    return float(torch.kthvalue(flat, k).values)


# -- the PyTorch twin ---------------------------------------------------------------------------
def _topk_torch(flat: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk (tie order unspecified) made exact: keep everything above the k-th value, then
    the lowest-indexed values equal to it, then order by (value desc, index asc)."""
    nan = torch.isnan(flat)
    has_nan = bool(nan.any())
    k = min(k, flat.numel() - int(nan.sum()) if has_nan else flat.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    # -inf in place of NaN lets topk run; NaN can still not be chosen below, since
    # `flat == bar` is False for NaN and `filled > bar` is False for -inf.
    filled = flat.masked_fill(nan, -torch.inf) if has_nan else flat
    bar = torch.topk(filled, k, sorted=False).values.min()
    above = torch.nonzero(filled > bar).squeeze(1)
    ties = torch.nonzero(flat == bar).squeeze(1)[: k - above.numel()]
    idx = torch.cat([above, ties]).sort().values  # index asc ...
    order = torch.sort(flat[idx], descending=True, stable=True).indices  # ... then value desc
    return idx[order]


def _top2_torch(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loop over the R rows (3x faster than torch.topk(X, 2, dim=0) on [25, 530k] float64);
    strict ``>`` keeps the first row on ties, ``fmax`` skips NaN as the C++ ``>`` does."""
    first, second = X[0].clone(), torch.full_like(X[0], -torch.inf)
    arg = torch.zeros(X.shape[1], dtype=torch.int64)
    for r in range(1, X.shape[0]):
        x = X[r]
        better = x > first
        second = torch.where(better, first, torch.fmax(second, x))
        first = torch.where(better, x, first)
        arg.masked_fill_(better, r)
    return first, arg, second


def _csr(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.zeros(len(parts) + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor([p.numel() for p in parts], dtype=torch.int64).cumsum(0)
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return indptr, index


# -- checks and conversions ---------------------------------------------------------------------
def _check(values: torch.Tensor, k: int, backend: str | None, what: str):
    if not isinstance(values, torch.Tensor):
        raise UsageError(f"{what}: values must be a torch.Tensor, got {type(values).__name__}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise UsageError(f"{what}: k must be an int, got {k!r}")
    if k < 0:
        raise UsageError(f"{what}: k must be >= 0, got {k}")
    if values.is_complex():
        raise UsageError(f"{what}: complex values have no order, got {values.dtype}")
    return _as_real(values), k, resolve_backend(backend)


def _check_groups(groups: torch.Tensor, values: torch.Tensor, num_groups: int) -> torch.Tensor:
    if not isinstance(groups, torch.Tensor) or groups.dtype != torch.int64:
        got = getattr(groups, "dtype", type(groups).__name__)
        raise UsageError(f"topk_groups: groups must be an int64 tensor, got {got}")
    if groups.numel() != values.numel():
        raise UsageError(
            f"topk_groups: groups has {groups.numel()} entries, values {values.numel()}"
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise UsageError(f"topk_groups: num_groups must be an int >= 0, got {num_groups!r}")
    if groups.numel() and int(groups.max()) >= num_groups:
        raise UsageError(
            f"topk_groups: group id {int(groups.max())} is not below num_groups={num_groups}"
        )
    return groups.detach()


def resolve_backend(backend: str | None) -> str:
    """``None`` -> the built extension, else ``"torch"`` (warned once); ``"cpp"`` when the
    extension is missing is an error."""
    ext, why = _extension()
    if backend is None:
        backend = "cpp" if ext is not None else "torch"
        if ext is None:
            _warn_fallback()
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "cpp" and ext is None:
        raise UsageError(
            f"backend='cpp' asked for, but culture_neurons._C does not import ({why}); "
            "build it with `python setup.py build_ext --inplace` or use backend='torch'"
        )
    return backend


def _as_real(values: torch.Tensor) -> torch.Tensor:
    """float32/float64 unchanged; half types as float32, integers and bool as float64 (exact)."""
    if values.dtype in (torch.float32, torch.float64):
        return values.detach()
    if values.is_floating_point():
        return values.detach().float()
    return values.detach().double()


def _to_numpy(values: torch.Tensor):
    return values.cpu().contiguous().numpy()
