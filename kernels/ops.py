"""The fused op behind the fused MLP backend: its paths, its custom op and its two faces.

Symbols: R rows (flattened tokens), N neurons, C cultures, num_sets ablation sets.

``act_and_record``: ``h = act(g) * u`` with per-culture ``K, S, Q`` totals updated in place and
optional per-row ablation or steering (math in ``act_record.py``).

Two paths compute it: the Triton kernel (CUDA tensors; self-checked once per device, dtype and
variant, see :mod:`.dispatch`) and PyTorch over row chunks of bounded size (every other device;
the production path on CPU), through :mod:`culture_neurons.instrument.reduce`, the reduction
every non-Triton path shares. Two faces call them:

- :func:`act_and_record`: the checked, general face (any leading dims, optional everything);
- :class:`LayerOp`: one layer's op with its totals, mask and options checked once (per attach),
  so that a forward pays only for what changes per call (the fused backend uses it).

Eagerly both call the chosen path directly; under ``torch.compile`` they go through the custom
op ``culture_neurons::act_and_record`` (opaque to the compiler, CUDA-graph safe), which runs the
same function. triton is imported only when a CUDA kernel is first launched, so this module
imports on machines without triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from culture_neurons.errors import CultureNeuronsError, UsageError
from culture_neurons.instrument import reduce
from culture_neurons.stats import ACTIVATIONS

from . import dispatch

ACT_FNS = ("silu", "gelu_tanh")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def act(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act(g)``: ``"silu"`` (g * sigmoid(g)) or ``"gelu_tanh"`` (torch ``gelu(approximate="tanh")``,
    ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``). The helper every backend uses."""
    if act_fn == "silu":
        return F.silu(g)
    if act_fn == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")


def _act_(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act`` in place on ``g`` (a temporary the caller owns); returns g."""
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
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
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
    if activation not in ACTIVATIONS:
        _fail("unknown activation", repr(activation), f"use one of {ACTIVATIONS}")
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
        if culture.shape != (R,) or culture.dtype not in (torch.int32, torch.int64):
            _fail("culture must be [R] int32/int64",
                  f"{tuple(culture.shape)} {culture.dtype} for R={R}",
                  "pass one culture id per row, -1 = not counted")
        for name, acc, dtype in (("K", K, torch.int64), ("S", S, torch.float64),
                                 ("Q", Q, torch.float64)):
            if acc.dim() != 2 or acc.shape[1] != N or acc.shape[0] != K.shape[0]:
                _fail(f"{name} must be [C, N] with N={N} and the same C as K",
                      f"{name}{tuple(acc.shape)}, K{tuple(K.shape)}", "allocate [C, N]")
            if acc.dtype != dtype:
                _fail(f"{name} must be {dtype} (the statistics' totals)", str(acc.dtype),
                      f"allocate it as {dtype}")
            if not acc.is_contiguous():
                _fail(f"{name} must be contiguous [C, N]", f"strides {acc.stride()}",
                      "use a per-layer contiguous accumulator and copy into [C, L, N] at the end")
            if acc.device != gate.device or culture.device != gate.device:
                _fail(f"{name} and culture must be on gate's device",
                      f"{acc.device}, {culture.device} vs {gate.device}", "move them")
    if do_ablate:
        if keep.dim() != 2 or keep.shape[1] != N:
            _fail("keep must be [num_sets, N]", f"{tuple(keep.shape)} for N={N}",
                  "pass one keep mask row per ablation set (1 keep, 0 ablate)")
        if set_ids.shape != (R,) or set_ids.dtype not in (torch.int32, torch.int64):
            _fail("set_ids must be [R] int32/int64",
                  f"{tuple(set_ids.shape)} {set_ids.dtype} for R={R}",
                  "pass one set id per row, -1 = no ablation")
        if keep.device != gate.device or set_ids.device != gate.device:
            _fail("keep and set_ids must be on gate's device",
                  f"{keep.device}, {set_ids.device} vs {gate.device}", "move them")


# --- PyTorch path (every device but CUDA) ------------------------------------------------------


def act_and_record_torch(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float = 0.0,
    chunk_rows: int | None = None,  # None: reduce.chunk_rows_for(gate)
) -> torch.Tensor:
    """The op's math in PyTorch over row chunks; fp32 arithmetic, ``h`` in gate's dtype.

    Per chunk: one fp32 ``act`` (in place on the fp32 copy of a half-precision gate), the
    ablated neurons zeroed, ``h`` written in place when the input is fp32, and K/S/Q added by
    :func:`culture_neurons.instrument.reduce.accumulate` (one chunk at a time, so its
    temporaries stay bounded too). A call of one chunk (decode steps, most prompts) slices
    nothing and allocates only what it returns.
    """
    chunk_rows = chunk_rows or reduce.chunk_rows_for(gate)
    args = (K, S, Q, keep, act_fn, activation, do_record, do_ablate, factor, chunk_rows)
    R, N = gate.shape
    if R <= chunk_rows:
        return _chunk(gate, up, culture, set_ids, None, *args)
    h = torch.empty((R, N), dtype=gate.dtype, device=gate.device)
    for start in range(0, R, chunk_rows):
        rows = slice(start, min(R, start + chunk_rows))
        _chunk(gate[rows], up[rows], culture[rows] if do_record else None,
               set_ids[rows] if do_ablate else None, h[rows], *args)  # fmt: skip
    return h


def _chunk(gate, up, culture, set_ids, out, K, S, Q, keep, act_fn, activation, do_record,
           do_ablate, factor, chunk_rows) -> torch.Tensor:  # fmt: skip
    """One chunk of :func:`act_and_record_torch`; ``h`` into ``out`` (a new tensor if None)."""
    fp32_in = gate.dtype == torch.float32
    a = act(gate, act_fn) if fp32_in else _act_(gate.float(), act_fn)  # a fresh fp32 tensor
    if do_ablate:
        reduce.ablate_(a, keep, set_ids, factor, chunk_rows)
    h = torch.mul(a, up, out=out) if fp32_in else a * up  # bf16/fp16 * fp32 promotes to fp32
    if do_record:
        reduce.accumulate(K, S, Q, h if activation == "post" else a, culture, chunk_rows)
    if fp32_in:
        return h
    return h.to(gate.dtype) if out is None else out.copy_(h)


# --- the chosen path --------------------------------------------------------------------------


def _run(gate, up, culture, K, S, Q, keep, set_ids, act_fn: str, activation: str,
         do_record: bool, do_ablate: bool, factor: float, one_culture: int = -1) -> torch.Tensor:
    """The op's body on every device: the Triton kernel where :mod:`.dispatch` says so (a
    launch that raises is reported there and this call redone in PyTorch), else PyTorch.
    Arguments already checked; unused ones may be None (Triton) or anything (PyTorch)."""
    variant = (act_fn, activation, do_record, do_ablate, do_ablate and factor != 0.0)
    if dispatch.use_kernel(gate.device, gate.dtype, variant, self_check):
        kernel = dispatch.triton_kernels()
        try:
            args = kernel.prepare(gate, up, culture, K, S, Q, keep, set_ids, do_record, do_ablate)
            return kernel.launch(*args, act_fn, activation, do_record, do_ablate, factor,
                                 one_culture)  # fmt: skip
        except CultureNeuronsError:
            raise
        except Exception as exc:  # compile or launch error: loud, and this call in PyTorch
            dispatch.kernel_failed(gate.device, gate.dtype, variant, exc)
    return act_and_record_torch(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                                do_record, do_ablate, factor)


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
    gate, up = gate_up[:, :N], gate_up[:, N:]
    rows = torch.arange(R)
    culture = (rows // 5 * 3) % (C + 1) - 1
    culture[:block_r] = torch.where(culture[:block_r] >= 0, 2, -1)
    culture = culture.to(torch.int32).to(device)
    set_ids = ((rows // 3) % (num_sets + 1) - 1).to(torch.int32).to(device)
    keep = (torch.rand(num_sets, N, generator=gen) > 0.3).to(torch.uint8).to(device)
    factor = 1.5 if steer else 0.0
    results = []
    for path in ("kernel", "torch"):
        K = torch.zeros(C, N, dtype=torch.int64, device=device)
        S = torch.zeros(C, N, dtype=torch.float64, device=device)
        Q = torch.zeros(C, N, dtype=torch.float64, device=device)
        args = (gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                do_ablate, factor)  # fmt: skip
        if path == "kernel":
            h = kernel.launch(*kernel.prepare(*args[:8], do_record, do_ablate), *args[8:])
        else:
            h = act_and_record_torch(*args)
        results.append([t.cpu().double() for t in (h, K, S, Q)])
    (h_k, K_k, S_k, Q_k), (h_t, K_t, S_t, Q_t) = results
    # Counts exactly; fp32 sums of <= R terms in another order (and a fast exp): 1e-4 of the
    # largest sum. h: the kernel's act (g / (1 + exp(-g)) with the GPU's fast exp) and torch's
    # are a few fp32 ulp apart, ~1e-6 relative; a half-precision h may then round to the
    # neighbouring value: one ulp of its dtype, two eps relative.
    h_rtol = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
    checks = [("h", h_k, h_t, h_rtol[dtype], 1e-6)]
    if do_record:
        checks += [("K", K_k, K_t, 0.0, 0.0),
                   ("S", S_k, S_t, 1e-4, 1e-4 * float(S_t.abs().max()) + 1e-6),
                   ("Q", Q_k, Q_t, 1e-4, 1e-4 * float(Q_t.abs().max()) + 1e-6)]  # fmt: skip
    for name, got, want, rtol, atol in checks:
        bad = (got - want).abs() > atol + rtol * want.abs()
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            where = f"(row {i}, neuron {j})" if name == "h" else f"(culture {i}, neuron {j})"
            return (f"{name} differs in {int(bad.sum())} of {bad.numel()} values; first at "
                    f"{where}: kernel {got[i, j].item():.9g}, PyTorch {want[i, j].item():.9g} "
                    f"(rtol {rtol:g}, atol {atol:.3g})")  # fmt: skip
    return None


# --- the custom op (torch.compile) -------------------------------------------------------------


@torch.library.custom_op("culture_neurons::act_and_record", mutates_args=("K", "S", "Q"))
def _act_and_record_op(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float,
) -> torch.Tensor:
    return _run(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                do_ablate, factor)


@_act_and_record_op.register_fake
def _act_and_record_fake(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                         do_record, do_ablate, factor):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _via_op(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record, do_ablate,
            factor) -> torch.Tensor:  # fmt: skip
    """The custom op, with an empty tensor for each unused argument (its schema wants them)."""
    dev, N = gate.device, gate.shape[1]
    if not do_record:
        culture = torch.empty(0, dtype=torch.int32, device=dev)
        K = torch.empty(0, N, dtype=torch.int64, device=dev)
        S = torch.empty(0, N, dtype=torch.float64, device=dev)
        Q = torch.empty(0, N, dtype=torch.float64, device=dev)
    if not do_ablate:
        keep = torch.empty(0, N, dtype=torch.uint8, device=dev)
        set_ids = torch.empty(0, dtype=torch.int32, device=dev)
    return _act_and_record_op(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation,
                              do_record, do_ablate, float(factor))


# --- the faces ---------------------------------------------------------------------------------


def act_and_record(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    act_fn: str = "silu",
    activation: str = "gate",
    culture: torch.Tensor | None = None,
    K: torch.Tensor | None = None,
    S: torch.Tensor | None = None,
    Q: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    set_ids: torch.Tensor | None = None,
    factor: float = 0.0,
) -> torch.Tensor:
    """``h = act(gate) * up`` (ablated neurons zeroed), recording per-culture statistics.

    Args:
        gate: ``[..., N]`` ``gate_proj(x)``, fp32/fp16/bf16; the leading dims are the R rows.
        up: ``[..., N]`` ``up_proj(x)``, same shape and dtype as gate.
        act_fn: ``"silu"`` or ``"gelu_tanh"``.
        activation: which tensor is ``a``: ``"gate"`` (``act(gate)``) or ``"post"`` (``h``).
        culture: ``[...]`` (gate's leading dims) int32/int64 culture id per row,
            ``-1`` = row not counted (padding, out of scope). None: record nothing.
        K: ``[C, N]`` int64 contiguous, ``K[c, j] += #rows of c with a[r, j] > 0``.
        S: ``[C, N]`` float64 contiguous, ``S[c, j] += sum of a[r, j]`` over rows of c.
        Q: ``[C, N]`` float64 contiguous, ``Q[c, j] += sum of a[r, j]^2`` over rows of c.
        keep: ``[num_sets, N]`` bool/uint8/float, nonzero = keep, 0 = ablate. None: no ablation.
        set_ids: ``[...]`` int32/int64 ablation set id per row, ``-1`` = no ablation.
        factor: what a row's selected neurons' ``act`` is multiplied by: ``0`` ablates (exactly
            0, SPEC's ``a := 0``), ``1 + alpha`` steers (SPEC's ``a := (1 + alpha) a``).

    Ablated neurons have ``a = 0`` and ``h = 0``; the statistics see the ablated (or steered)
    value. Math in fp32 whatever the input dtype (sums are fp32 within a tile or chunk, then
    added to the fp64 totals); ``h`` is returned in gate's dtype and shape. Every argument is
    checked on every call: a caller that calls once per layer per forward with the same totals
    and mask binds them once in a :class:`LayerOp` instead.

    Returns:
        ``h`` ``[..., N]``, the input of down_proj.

    Raises:
        UsageError: inconsistent shapes, dtypes, devices, layouts or (CPU tensors) ids >= C or
            >= num_sets. On CUDA and under torch.compile such ids are not checked (that would
            read the data: a device sync per call) and the op ignores them.
        KernelError: the Triton kernel is forced (``CULTURE_NEURONS_KERNEL=triton``) and
            unavailable or wrong here (see :mod:`.dispatch`).
    """
    shape = gate.shape
    N = shape[-1]
    gate2, up2 = gate.reshape(-1, N), up.reshape(-1, N)
    R = gate2.shape[0]
    do_record = culture is not None
    if do_record and (K is None or S is None or Q is None):
        raise UsageError("act_and_record: culture given without K, S and Q; "
                         "pass all four to record, or none")
    do_ablate = keep is not None
    if do_ablate != (set_ids is not None):
        raise UsageError("act_and_record: keep and set_ids go together "
                         f"(given keep={keep is not None}, set_ids={set_ids is not None})")
    if do_record and culture.shape != shape[:-1]:
        raise UsageError(f"act_and_record: culture must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(culture.shape)}")
    if do_ablate and set_ids.shape != shape[:-1]:
        raise UsageError(f"act_and_record: set_ids must be gate's leading dims "
                         f"{tuple(shape[:-1])}, given {tuple(set_ids.shape)}")
    rc = culture.reshape(R) if do_record else None
    rs = set_ids.reshape(R) if do_ablate else None
    check_act_and_record_args(gate2, up2, rc, K, S, Q, keep, rs, act_fn, activation, do_record,
                              do_ablate)  # fmt: skip
    # Value checks read the data: only on CPU (no device sync) and outside torch.compile.
    compiling = torch.compiler.is_compiling()
    check_values = gate.device.type == "cpu" and R > 0 and not compiling
    if do_record and check_values and int(rc.max()) >= K.shape[0]:
        raise UsageError(f"act_and_record: culture id {int(rc.max())} >= C = {K.shape[0]}; "
                         "allocate K, S, Q with one row per culture")
    if do_ablate and check_values and int(rs.max()) >= keep.shape[0]:
        raise UsageError(f"act_and_record: set id {int(rs.max())} >= num_sets = "
                         f"{keep.shape[0]}; pass one keep row per set")
    run = _via_op if compiling else _run
    h = run(gate2, up2, rc, K, S, Q, keep, rs, act_fn, activation, do_record, do_ablate,
            float(factor))  # fmt: skip
    return h.reshape(shape)


class LayerOp:
    """:func:`act_and_record` bound to one layer: its totals, keep mask and options are checked
    once, here, so that a call checks only what changes per forward (gate, up, the row ids).

    Args:
        N: the layer's neurons.
        device: where its tensors live.
        act_fn, activation, factor: as in :func:`act_and_record`.
        K, S, Q: ``[C, N]`` int64 / float64 / float64 contiguous totals on ``device``, updated
            in place by every recording call (None: this op never records).
        keep: ``[num_sets, N]`` keep mask on ``device`` (None: this op never ablates).

    Call: ``op(gate, up, culture=None, set_ids=None, one_culture=-1) -> h``, gate and up
    ``[..., N]``; culture and set_ids one id per row (any shape with R elements, int32 spares a
    conversion), None = no recording / no ablation for this call; ``one_culture``: the only
    culture id among the rows when the caller knows it (-1: unknown), which spares the kernel
    its search. Ids are not range-checked here (the caller builds them checked, as
    ``instrument.rows`` does); the kernels ignore out-of-range ids.
    """

    def __init__(self, N: int, device: torch.device | str, *, act_fn: str, activation: str = "gate",
                 factor: float = 0.0, K: torch.Tensor | None = None, S: torch.Tensor | None = None,
                 Q: torch.Tensor | None = None, keep: torch.Tensor | None = None):  # fmt: skip
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as tensors report it: "cuda:0"
            device = torch.device("cuda", torch.cuda.current_device())
        can_record, can_ablate = K is not None, keep is not None
        if keep is not None and keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)  # same bytes, read as the kernel reads them
        probe = torch.empty(0, N, device=device)
        ids = torch.empty(0, dtype=torch.int32, device=device)
        check_act_and_record_args(probe, probe, ids, K, S, Q, keep, ids, act_fn, activation,
                                  can_record, can_ablate)  # fmt: skip
        self.N, self.device = N, device
        self.act_fn, self.activation, self.factor = act_fn, activation, float(factor)
        self.K, self.S, self.Q, self.keep = K, S, Q, keep

    def __call__(self, gate: torch.Tensor, up: torch.Tensor, culture: torch.Tensor | None = None,
                 set_ids: torch.Tensor | None = None, one_culture: int = -1) -> torch.Tensor:  # fmt: skip
        N = self.N
        if (gate.shape != up.shape or gate.shape[-1] != N or gate.dtype != up.dtype
                or gate.dtype not in FLOAT_DTYPES or gate.device != self.device):
            _fail("gate and up must be [..., N] of one float dtype on the layer's device",
                  f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} "
                  f"{up.dtype}; N={N} on {self.device}", "pass this layer's gate_proj/up_proj")
        flat = gate.dim() == 2  # the usual case: no reshapes (each costs a few us)
        gate2, up2 = (gate, up) if flat else (gate.reshape(-1, N), up.reshape(-1, N))
        R = gate2.shape[0]
        do_record = culture is not None
        do_ablate = set_ids is not None
        if do_record and (self.K is None or culture.numel() != R):
            _fail("culture must give one id per row of a recording op",
                  f"{None if culture is None else culture.numel()} ids for R={R}, "
                  f"recording={self.K is not None}", "pass culture only to a recording op")
        if do_ablate and (self.keep is None or set_ids.numel() != R):
            _fail("set_ids must give one id per row of an ablating op",
                  f"{set_ids.numel()} ids for R={R}, ablating={self.keep is not None}",
                  "pass set_ids only to an op bound to a keep mask")
        if do_record and culture.dim() != 1:
            culture = culture.reshape(R)
        if do_ablate and set_ids.dim() != 1:
            set_ids = set_ids.reshape(R)
        args = (gate2, up2, culture, self.K, self.S, self.Q, self.keep, set_ids, self.act_fn,
                self.activation, do_record, do_ablate, self.factor)  # fmt: skip
        if torch.compiler.is_compiling():
            h = _via_op(*args)
        else:
            h = _run(*args, one_culture=one_culture if do_record else -1)
        return h if flat else h.view(gate.shape)
