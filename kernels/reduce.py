"""The one reduction of the package: per-culture statistics and per-row ablation in PyTorch.

Symbols: R token rows, N neurons of one layer, C cultures, S ablation sets.
Every path that does not run the Triton kernel goes through here: the hooks backend, the fused
backend's eager path, the fused op on CPU (``torch_path.py`` beside it) and the functional API,
so they cannot disagree. For one layer's recorded activation ``a [R, N]`` and per-row
``culture [R]`` (-1 = not counted):

    K[c, n] += sum_{r: culture[r] = c} [a[r, n] > 0]     int64, exact
    S[c, n] += sum_{r: culture[r] = c} a[r, n]           fp32 within a chunk, fp64 totals
    Q[c, n] += sum_{r: culture[r] = c} a[r, n]^2         fp32 within a chunk, fp64 totals

On the CPU, fp32 and bf16 rows go through one call of the C++ extension ``_accumulate``
(``csrc/accumulate.cpp``, :data:`NATIVE`) where it is built: the same fp32 sums in the same row
order and the same folds, so the totals are identical bit for bit (tests/kernels/test_reduce.py),
at a few microseconds a layer instead of a dozen small ops (bench_record's small models).

Rows are taken ``CHUNK_ROWS`` at a time, so the temporaries are bounded whatever the batch and
the totals stay on ``a``'s device (nothing moves to the host, nothing syncs). Within a chunk the
counts go through fp32, exact because a chunk has fewer than 2^24 rows.

Ablation: ``keep [S, N]`` (uint8, 1 = keep, 0 = ablate; built once per mask set by
``Masks.keep_mask``) and per-row ``set_ids [R]``; set id -1 (or any
id outside [0, S)) ablates nothing, without a branch or a sync.
"""

from __future__ import annotations

import torch

try:  # one call per layer on the CPU (csrc/accumulate.cpp); without it the PyTorch path below
    from . import _accumulate as NATIVE
except ImportError:  # no compiler at install time, or a checkout never built in place
    NATIVE = None

# Rows per chunk. On a CPU the [chunk, N] fp32 temporary is held to CPU_CHUNK_BYTES so that a
# chunk's five passes run in the last-level cache. Measured on a 2-core EPYC (32 MiB L3), 25
# cultures, one thread, accumulate() against 2048-row chunks: 4096 x 4736 fp32 rows, 1024-row
# chunks 0.56x the time (bf16: 0.53x); 2048 x 18944, 256-row chunks 0.51x. Elsewhere (CUDA)
# CHUNK_ROWS, for fewer launches: 2048 x 18944 x 4 B = 155 MB at the 7B width. Both keep the
# fp32 counts exact (< 2^24 rows).
CHUNK_ROWS = 2048
CPU_CHUNK_BYTES = 16 << 20


def chunk_rows_for(a: torch.Tensor) -> int:
    """Rows per chunk for activations ``a [R, N]`` on their device (see CPU_CHUNK_BYTES)."""
    if a.device.type != "cpu":
        return CHUNK_ROWS
    return _cpu_chunk_rows(a.shape[-1])


def _cpu_chunk_rows(N: int) -> int:
    return max(64, min(CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * max(N, 1))))


# --- ablation ----------------------------------------------------------------------------------


def ablated_rows(keep: torch.Tensor, set_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[R, N]``: True where row r's set ablates neuron n (``keep[set_ids[r], n] == 0``);
    all False for set id -1 or an id outside ``[0, S)``. One chunk's worth: callers with many
    rows go through :func:`ablate_` / :func:`ablate`, which chunk."""
    num_sets = keep.shape[0]
    set_ids = set_ids.to(keep.device, non_blocking=True).long()
    if num_sets == 0:
        return torch.zeros(set_ids.shape[0], keep.shape[1], dtype=torch.bool, device=keep.device)
    valid = (set_ids >= 0) & (set_ids < num_sets)
    rows = keep.index_select(0, set_ids.clamp(0, num_sets - 1)) == 0
    return rows & valid[:, None]


def ablate_(a: torch.Tensor, keep: torch.Tensor, set_ids: torch.Tensor, factor: float = 0.0,
            chunk_rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """Each row's set's neurons of ``a [R, N]``, in place: set to exactly 0 (``factor`` 0,
    SPEC's ``a := 0``) or multiplied by ``factor`` (steering: ``1 + alpha``)."""
    step = chunk_rows or chunk_rows_for(a)
    for start in range(0, a.shape[0], step):
        part = a[start : start + step]
        selected = ablated_rows(keep, set_ids[start : start + step])
        if factor == 0.0:
            part.masked_fill_(selected, 0)
        else:
            part.copy_(torch.where(selected, part * factor, part))
    return a


def ablate(a: torch.Tensor, keep: torch.Tensor, set_ids: torch.Tensor,
           factor: float = 0.0) -> torch.Tensor:  # fmt: skip
    """:func:`ablate_` out of place (for tensors autograd still needs), same values."""
    if a.requires_grad and torch.is_grad_enabled():
        selected = ablated_rows(keep, set_ids)
        return a.masked_fill(selected, 0) if factor == 0.0 else torch.where(selected, a * factor, a)
    return ablate_(a.clone(), keep, set_ids, factor)


# --- statistics --------------------------------------------------------------------------------


def accumulate(
    K: torch.Tensor,  # [C, N] int64, updated in place
    S: torch.Tensor,  # [C, N] float64, updated in place
    Q: torch.Tensor,  # [C, N] float64, updated in place
    a: torch.Tensor,  # [R, N] any float dtype, on K's device
    culture: torch.Tensor,  # [R] int, -1 (or >= C) = not counted
    chunk_rows: int | None = None,  # None: chunk_rows_for(a)
) -> None:
    """Add the statistics of ``a`` per culture into ``K, S, Q`` (see the module docstring).

    ``index_add_`` makes one pass over ``a`` per statistic (R x N adds); a one-hot ``[C, R]``
    matmul is C x R x N flops and measured ~10x slower (512 x 4096, C = 25, one CPU core: 3 ms
    vs 0.3 ms). Counts go through fp32 ``index_add_`` (int32 measured 30x slower on CPU).
    """
    C, N = K.shape
    R = a.shape[0]
    if R == 0 or C == 0:
        return
    if a.requires_grad:
        a = a.detach()
    chunk_rows = chunk_rows or chunk_rows_for(a)
    if _native(K, S, Q, a, culture):
        a = a.contiguous()
        _add_native((K.data_ptr(), S.data_ptr(), Q.data_ptr()), a, culture, C, N, chunk_rows)
        return
    slots = _slots(culture, C, a.device)
    # One [C + 1, N] fp32 buffer per statistic (row C collects the uncounted rows) and ONE
    # [chunk, N] fp32 temporary, whatever a's dtype: the peak is bounded by the chunk. Views
    # made once per call and no slicing for a call of one chunk (most calls): every layer of
    # every forward runs this, and on a small model each small op counts (see bench_record).
    sums = torch.zeros(3, C + 1, N, dtype=torch.float32, device=a.device)
    k_sum, s_sum, q_sum = sums.unbind(0)
    k_fold, s_fold, q_fold = sums[:, :C].unbind(0)
    scratch = torch.empty(min(R, chunk_rows), N, dtype=torch.float32, device=a.device)
    for start in range(0, R, chunk_rows):
        x, slot, buf = a, slots, scratch
        if R > chunk_rows:
            x, slot = a[start : start + chunk_rows], slots[start : start + chunk_rows]
            buf = scratch[: x.shape[0]]
            if start:
                sums.zero_()
        if x.dtype == torch.float32:
            s_sum.index_add_(0, slot, x)
            torch.mul(x, x, out=buf)
        else:  # the fp32 copy is the temporary; squared in place once S has it
            buf.copy_(x)
            s_sum.index_add_(0, slot, buf)
            buf.mul_(buf)
        q_sum.index_add_(0, slot, buf)
        torch.gt(x, 0, out=buf)  # a > 0 in a's own dtype: the fp32 conversion keeps the sign
        k_sum.index_add_(0, slot, buf)
        K.add_(k_fold.to(torch.int64))
        S.add_(s_fold)
        Q.add_(q_fold)


class LayerSums(tuple):
    """One layer's ``(K, S, Q)`` totals (a tuple, as :func:`accumulate` takes them), checked
    once for the C++ call: ``sums.add(a, culture)`` is ``accumulate(*sums, a, culture)``.
    Every recorded layer of every forward adds; on a small model the checks on the totals
    cost as much as the C++ call (bench_record), and the totals never change shape, dtype,
    device or address (they are zeroed and copied into in place)."""

    def __new__(cls, K: torch.Tensor, S: torch.Tensor, Q: torch.Tensor):
        self = super().__new__(cls, (K, S, Q))
        self.C, self.N = K.shape
        self.native = _native_totals(K, S, Q)
        self.addresses = (K.data_ptr(), S.data_ptr(), Q.data_ptr())
        self.chunk_rows = _cpu_chunk_rows(self.N)
        return self

    def add(self, a: torch.Tensor, culture: torch.Tensor) -> None:
        """:func:`accumulate` of ``a [..., N]`` (its rows flattened) by ``culture [R]`` into
        these totals."""
        if self.native and a.is_contiguous() and _native_rows(a, culture, self.N):
            _add_native(self.addresses, a, culture, self.C, self.N, self.chunk_rows)
        else:
            accumulate(*self, a.reshape(-1, a.shape[-1]), culture)


_NATIVE_ROWS = (torch.float32, torch.bfloat16)
_NATIVE_IDS = (torch.int32, torch.int64)


def _native(K, S, Q, a, culture) -> bool:
    """Whether :data:`NATIVE` takes this call: built, everything on the CPU, fp32 or bf16 rows,
    int32 / int64 ids, contiguous int64 / fp64 totals (the extension reads raw addresses).
    It adds the same numbers in the same order as the PyTorch path (tests: bit for bit)."""
    return _native_totals(K, S, Q) and _native_rows(a, culture, K.shape[1])


def _native_totals(K, S, Q) -> bool:
    """:func:`_native`'s half on the totals: built, contiguous int64 / fp64 ``[C, N]`` on the
    CPU (checked once per layer by :class:`LayerSums`)."""
    return (
        NATIVE is not None
        and K.dtype == torch.int64
        and S.dtype == Q.dtype == torch.float64
        and K.shape == S.shape == Q.shape
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (K, S, Q))
    )


def _native_rows(a, culture, N: int) -> bool:
    """:func:`_native`'s half on a call's rows: fp32 / bf16 ``a [..., N]`` (the caller makes it
    contiguous) and contiguous int32 / int64 ids, one per row, on the CPU."""
    return (
        a.is_cpu
        and culture.is_cpu
        and a.dtype in _NATIVE_ROWS
        and culture.dtype in _NATIVE_IDS
        and culture.is_contiguous()
        and a.shape[-1] == N
        and a.numel() == culture.numel() * N
    )


def _add_native(addresses: tuple[int, int, int], a, culture, C: int, N: int,
                chunk_rows: int) -> None:  # fmt: skip
    """The C++ call for contiguous rows :func:`_native_rows` accepts, into the totals at
    ``addresses``."""
    NATIVE.accumulate(*addresses, a.data_ptr(), culture.data_ptr(), a.dtype == torch.bfloat16,
                      culture.dtype == torch.int64, C, N, culture.numel(), chunk_rows)


# The last row ids made slots (see _slots): every layer of a forward passes the same ``culture``
# tensor, so its slots are made once per forward, not once per layer (5 small ops each time).
_last_slots: tuple = (None, -1, -1, None, None)


def _slots(culture: torch.Tensor, C: int, device: torch.device) -> torch.Tensor:
    """int64 ``[R]`` rows of the ``[C + 1, N]`` sums: the culture id, or C (not counted) for -1
    and ids outside ``[0, C)``. Reused while ``culture`` is the same tensor, unchanged (its
    version counter moves on any in-place write), for the same C and device."""
    global _last_slots
    # An inference-mode tensor has no version counter: its slots are made every time.
    version = -1 if culture.is_inference() else culture._version
    last, last_version, last_C, last_device, slots = _last_slots
    if (last is culture and version >= 0 and last_version == version and last_C == C
            and last_device == device):  # fmt: skip
        return slots
    c = culture.to(device, non_blocking=True)
    slots = torch.where((c >= 0) & (c < C), c, C).long()
    _last_slots = (culture, version, C, device, slots) if version >= 0 else (None, -1, -1, None, None)
    return slots
