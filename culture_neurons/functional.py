"""The functional API: record and ablate inside someone else's forward code, no model patching.

For libraries that already own the forward pass (nnsight, TransformerLens, pyvene, a custom
loop): they hand us each decoder layer's MLP activations and we add their statistics into a
:class:`~culture_neurons.stats.Stats` or zero the neurons of a :class:`~culture_neurons.masks.Masks`
set. Same numbers as :class:`~culture_neurons.instrument.Instrument` (SPEC "Definitions").

Symbols: C cultures, L layers, N neurons per layer, S mask sets; ``[...]`` are the caller's
leading dims (e.g. ``[B, T]``), each position one token row.

Per-row arguments share one convention. ``culture`` holds culture ids (``-1`` = not counted),
``set_ids`` ablation-set ids (``-1`` = no ablation), ``weights`` 0/1 token weights (0 = not
counted; e.g. the ``attention_mask``). Each may be given for every row (``[...]``) or for a
prefix of the leading dims (``[B]`` per item for ``[B, T, N]`` activations), and is then
repeated over the remaining dims. An int applies to every row.

Counting tokens happens once per forward, not once per layer, so it is its own call::

    stats = Stats.zeros(cultures, fingerprint(model), activation="gate")
    for batch, item_culture in loader:                 # item_culture [B]
        w = batch["attention_mask"]                    # [B, T]
        count_tokens(stats, item_culture, w)           # T += counted tokens (once)
        count_items(stats, item_culture)               # items += 1 per item (once)
        ... in the forward, for every layer l:
        accumulate(stats, l, a_l, item_culture, w)     # K, S, Q of layer l (a_l [B, T, N])

or, from the MLP's pre-activations, with the fused op (the activations are not written out
for the statistics on CUDA)::

        h = accumulate_mlp(stats, l, gate_proj(x), up_proj(x), item_culture, w)
        y = down_proj(h)

``mlp_forward(mlp, x, ...)`` does the whole gated MLP of one HF decoder layer, recording and/or
ablating. Counts are exact int64; sums are fp64 (``accumulate``) or fp32 within the call then
fp64 (``accumulate_mlp``, as the fused backend).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import StatsMismatchError, UsageError
from .kernels.ops import ACT_FNS, act_and_record
from .masks import Masks
from .stats import ACTIVATIONS, Stats

__all__ = [
    "ablate",
    "ablate_",
    "accumulate",
    "accumulate_mlp",
    "count_items",
    "count_tokens",
    "keep_mask",
    "mlp_forward",
    "row_ids",
]

# Rows per chunk in ``accumulate``: bounds the fp64 copy of the counted rows to chunk x N
# (4096 x 18944 x 8 B = 620 MB for the 7B models) whatever the batch size.
CHUNK_ROWS = 4096


# --- per-row ids -------------------------------------------------------------------------------


def _per_row(x: torch.Tensor | int, lead: torch.Size, name: str, device) -> torch.Tensor:
    """``x`` repeated to the leading dims ``lead``: ``x.shape`` must be a prefix of ``lead``."""
    x = torch.as_tensor(x, device=device)
    if tuple(lead[: x.dim()]) != tuple(x.shape):
        raise UsageError(
            f"{name} has shape {tuple(x.shape)}, which is not a prefix of the activations' leading "
            f"dims {tuple(lead)}; give one value per row ({tuple(lead)}) or per item "
            f"({tuple(lead[:1])})"
        )
    return x.reshape(*x.shape, *([1] * (len(lead) - x.dim()))).expand(lead)


def row_ids(
    culture: torch.Tensor | int,
    lead: torch.Size | tuple[int, ...],
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 culture id per row ``lead`` (e.g. ``[B, T]``): ``culture`` where ``weights`` is 1,
    ``-1`` (not counted) where it is 0 or ``culture`` is -1.

    Args:
        culture: ``[...]`` int, or a prefix of ``lead`` (per item), or an int; -1 = not counted.
        lead: the leading dims of the activations (their shape without the last dim N).
        weights: ``[...]`` 0/1 (bool, int or float; a prefix of ``lead`` too), None = all 1.

    Raises:
        UsageError: a shape that is not a prefix of ``lead``; weights other than 0/1 (checked
            on CPU tensors only: elsewhere that would cost a device sync).
    """
    lead = torch.Size(lead)
    ids = _per_row(culture, lead, "culture", device)
    if ids.is_floating_point():
        raise UsageError(f"culture ids must be integers, got {ids.dtype}; -1 = not counted")
    ids = ids.long()
    if weights is None:
        return ids
    w = _per_row(weights, lead, "weights", ids.device)
    if w.device.type == "cpu" and bool(((w != 0) & (w != 1)).any()):
        raise UsageError(
            "token weights must be 0 or 1 (SPEC: w_t in {0, 1}), got other values; pass the "
            "attention mask or a bool mask of the tokens to count"
        )
    return torch.where(w != 0, ids, -1)


def _check_culture_range(ids: torch.Tensor, C: int) -> None:
    # Value check reads the data: CPU tensors only (a device sync elsewhere).
    if ids.device.type == "cpu" and ids.numel() and (int(ids.max()) >= C or int(ids.min()) < -1):
        raise UsageError(
            f"culture ids must be in [-1, {C - 1}] for these stats' {C} cultures, got "
            f"[{int(ids.min())}, {int(ids.max())}]; -1 = not counted"
        )


# --- token and item counts (once per forward) --------------------------------------------------


def count_tokens(
    stats: Stats, culture: torch.Tensor | int, weights: torch.Tensor | None = None
) -> None:
    """``T[c] += number of counted rows of culture c``, in place. Call ONCE per forward.

    Args:
        stats: the statistics to add into.
        culture: ``[...]`` culture id per row, or per item (a prefix of weights' shape, e.g.
            ``[B]`` with weights ``[B, T]``); -1 = not counted.
        weights: ``[...]`` 0/1 token weights (e.g. the attention mask ``[B, T]``); None: every
            row of ``culture`` counts once.

    The rows counted here must be the rows passed to :func:`accumulate` for every layer,
    otherwise ``P = K / T`` is not a probability.
    """
    culture = torch.as_tensor(culture)
    lead = weights.shape if weights is not None else culture.shape
    ids = row_ids(culture, lead, weights).reshape(-1)
    C = len(stats.cultures)
    _check_culture_range(ids, C)
    counted = ids[ids >= 0]
    stats.T += torch.bincount(counted, minlength=C).to(stats.T.device)


def count_items(stats: Stats, item_culture: torch.Tensor | list[int]) -> None:
    """``items[c] += number of items (prompts) of culture c``, in place. Call ONCE per forward.

    Args:
        item_culture: ``[B]`` culture id per item, -1 = not counted.
    """
    ids = torch.as_tensor(item_culture).reshape(-1).long()
    C = len(stats.cultures)
    _check_culture_range(ids, C)
    stats.items += torch.bincount(ids[ids >= 0], minlength=C).to(stats.items.device)


# --- statistics of one layer -------------------------------------------------------------------


def _check_layer(stats_or_masks, layer: int, N: int) -> None:
    fp = stats_or_masks.fingerprint
    if not 0 <= layer < fp.num_layers:
        raise UsageError(f"layer {layer} out of range for a model of {fp.num_layers} layers")
    if N != fp.num_neurons:
        raise StatsMismatchError(
            f"activations have N = {N} neurons but the model fingerprint says "
            f"{fp.num_neurons}; pass the decoder MLP's intermediate activations of this model"
        )


def accumulate(
    stats: Stats,
    layer: int,
    a: torch.Tensor,
    culture: torch.Tensor | int,
    weights: torch.Tensor | None = None,
) -> None:
    """Add the statistics of activations ``a`` of decoder layer ``layer`` into ``stats``, in place.

    ``K[c, layer, n] += #rows of c with a > 0``, ``S[c, layer, n] += sum a``,
    ``Q[c, layer, n] += sum a^2``: counts exact (int64), sums in fp64. ``T`` and ``items`` are
    not touched (see :func:`count_tokens`, :func:`count_items`): a forward visits every layer.

    Args:
        stats: statistics of C cultures over this model's L x N neurons.
        layer: decoder layer index l in [0, L).
        a: ``[..., N]`` the recorded activation, any float dtype and device. It must be what
            ``stats.activation`` names: ``"gate"`` = ``act_fn(gate_proj(x))``, ``"post"`` =
            ``act_fn(gate_proj(x)) * up_proj(x)`` (the input of down_proj).
        culture: ``[...]`` (or a prefix, e.g. ``[B]``) culture ids, -1 = not counted.
        weights: ``[...]`` (or a prefix) 0/1 token weights, None = all 1.

    Raises:
        UsageError: layer out of range, ids out of range, shapes that do not fit.
        StatsMismatchError: ``a`` has another N than the model of ``stats``.
    """
    N = a.shape[-1]
    _check_layer(stats, layer, N)
    ids = row_ids(culture, a.shape[:-1], weights, device=a.device).reshape(-1)
    C = len(stats.cultures)
    _check_culture_range(ids, C)
    rows = a.detach().reshape(-1, N)
    counted = ids >= 0
    rows, ids = rows[counted], ids[counted]
    # Partial sums on a's device, added once per call into the (usually CPU) totals.
    K = torch.zeros(C, N, dtype=torch.int64, device=a.device)
    S = torch.zeros(C, N, dtype=torch.float64, device=a.device)
    Q = torch.zeros(C, N, dtype=torch.float64, device=a.device)
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        x = rows[start : start + CHUNK_ROWS].double()
        c = ids[start : start + CHUNK_ROWS]
        K.index_add_(0, c, (x > 0).long())
        S.index_add_(0, c, x)
        Q.index_add_(0, c, x * x)
    _fold(stats, layer, K, S, Q)


def _fold(stats: Stats, layer: int, K, S, Q) -> None:
    """``stats.{K,S,Q}[:, layer] += K, S, Q`` (int64 / fp64, on the stats' device)."""
    dev = stats.K.device
    stats.K[:, layer] += K.to(dev, torch.int64)
    stats.S[:, layer] += S.to(dev, torch.float64)
    stats.Q[:, layer] += Q.to(dev, torch.float64)


# --- ablation ----------------------------------------------------------------------------------


def keep_mask(
    masks: Masks, layer: int, device: torch.device | str = "cpu", dtype=torch.bool
) -> torch.Tensor:
    """``dtype [S, N]`` keep mask of one layer: 0 where set s ablates neuron (layer, n), else 1.

    Built from the CSR entries of that layer only (O(selected) work), so calling it per layer
    and forward is cheap next to the MLP's matmuls; cache it when you run many forwards.
    """
    _check_layer(masks, layer, masks.num_neurons)
    N = masks.num_neurons
    in_layer = (masks.flat // N) == layer
    set_of = torch.arange(len(masks)).repeat_interleave(masks.sizes())[in_layer]
    keep = torch.ones(len(masks), N, dtype=dtype)
    keep[set_of, masks.flat[in_layer] % N] = 0
    return keep.to(device)


def _set_ids(masks: Masks, set_ids, lead: torch.Size, device) -> torch.Tensor:
    """int64 ``[...]`` set id per row (-1 = none), checked against the masks' S sets."""
    ids = _per_row(set_ids, lead, "set_ids", device)
    if ids.is_floating_point():
        raise UsageError(f"set ids must be integers, got {ids.dtype}; -1 = no ablation")
    ids = ids.long()
    S = len(masks)
    # Value check reads the data: CPU tensors only (a device sync elsewhere).
    if ids.device.type == "cpu" and ids.numel() and (int(ids.max()) >= S or int(ids.min()) < -1):
        raise UsageError(
            f"set ids must be in [-1, {S - 1}] for these masks' {S} sets ({', '.join(masks.names)})"
            f", got [{int(ids.min())}, {int(ids.max())}]; -1 = no ablation"
        )
    return ids


def _row_keep(masks: Masks, layer: int, set_ids, lead: torch.Size, device) -> torch.Tensor:
    """bool ``[..., N]`` per-row keep mask (set -1: all kept)."""
    ids = _set_ids(masks, set_ids, lead, device)
    S = len(masks)
    keep = keep_mask(masks, layer, device)
    keep_ext = torch.cat([keep, keep.new_ones(1, keep.shape[1])])  # row S: id -1, keeps all
    return keep_ext[torch.where(ids < 0, S, ids)]


def ablate(h: torch.Tensor, masks: Masks, layer: int, set_ids: torch.Tensor | int) -> torch.Tensor:
    """A copy of ``h`` with each row's set's neurons of ``layer`` set to exactly 0.

    Args:
        h: ``[..., N]`` ``act_fn(gate_proj(x))`` or the down_proj input ``act(gate) * up``:
            zeroing either removes the neuron's contribution to down_proj (SPEC "Ablation").
        masks: S sets of (layer, neuron) pairs of this model.
        layer: decoder layer index l in [0, L).
        set_ids: ``[...]`` (or a prefix, e.g. ``[B]``) set id per row, -1 = no ablation; an int
            applies to every row.

    Returns:
        ``[..., N]`` same dtype and device as ``h``.
    """
    _check_layer(masks, layer, h.shape[-1])
    keep = _row_keep(masks, layer, set_ids, h.shape[:-1], h.device)
    return h.masked_fill(~keep, 0)


def ablate_(h: torch.Tensor, masks: Masks, layer: int, set_ids: torch.Tensor | int) -> torch.Tensor:
    """:func:`ablate` in place on ``h`` (no copy of the activations); returns ``h``."""
    _check_layer(masks, layer, h.shape[-1])
    keep = _row_keep(masks, layer, set_ids, h.shape[:-1], h.device)
    return h.masked_fill_(~keep, 0)


# --- the fused path ----------------------------------------------------------------------------


def _mode(stats: Stats | None, act_fn: str | None, activation: str | None) -> tuple[str, str]:
    """(act_fn, activation), defaulting to what ``stats`` records; refuses a contradiction."""
    if stats is not None:
        for name, given, recorded in (
            ("act_fn", act_fn, stats.fingerprint.act_fn),
            ("activation", activation, stats.activation),
        ):
            if given is not None and given != recorded:
                raise StatsMismatchError(
                    f"{name}={given!r} but these stats record {name} {recorded!r}; leave "
                    f"{name} unset or record into stats made with {name}={given!r}"
                )
        return stats.fingerprint.act_fn, stats.activation
    act_fn = act_fn or "silu"
    if act_fn not in ACT_FNS:
        raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")
    return act_fn, activation or "gate"


def accumulate_mlp(
    stats: Stats | None,
    layer: int,
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor | int | None = None,
    weights: torch.Tensor | None = None,
    *,
    act_fn: str | None = None,
    activation: str | None = None,
    masks: Masks | None = None,
    set_ids: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``h = act_fn(gate) * up`` for the caller's down_proj, recording layer ``layer``'s stats.

    One call of the fused op (Triton on CUDA, chunked PyTorch elsewhere): the statistics of
    ``a`` (``stats.activation``: ``act(gate)`` or ``h``) are taken in the same pass, and
    ``masks``/``set_ids`` ablate per row (the statistics then see the ablated values, as the
    Instrument does). Sums are fp32 within the call, then added in fp64; counts are exact.

    Args:
        stats: where to add K, S, Q (not T: see :func:`count_tokens`); None = no recording.
        layer: decoder layer index l in [0, L).
        gate: ``[..., N]`` ``gate_proj(x)``, fp32/fp16/bf16.
        up: ``[..., N]`` ``up_proj(x)``, same shape and dtype.
        culture: ``[...]`` (or a prefix) culture ids, -1 = not counted; needed with ``stats``.
        weights: ``[...]`` (or a prefix) 0/1 token weights, None = all 1.
        act_fn: ``"silu"``/``"gelu_tanh"``; default and only allowed value with ``stats``: the
            fingerprint's.
        activation: ``"gate"``/``"post"``; default and only allowed value with ``stats``: its own.
        masks, set_ids: ablate ``set_ids`` rows' sets (``[...]`` or a prefix, -1 = none).

    Returns:
        ``h`` ``[..., N]`` in gate's dtype.
    """
    act_fn, activation = _mode(stats, act_fn, activation)
    if activation not in ACTIVATIONS:
        raise UsageError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    lead, N, dev = gate.shape[:-1], gate.shape[-1], gate.device
    op_args = {}
    if stats is not None:
        if culture is None:
            raise UsageError("accumulate_mlp: stats given without culture ids; pass culture")
        _check_layer(stats, layer, N)
        ids = row_ids(culture, lead, weights, device=dev)
        C = len(stats.cultures)
        _check_culture_range(ids, C)
        op_args.update(
            row_culture=ids,
            K=torch.zeros(C, N, dtype=torch.int32, device=dev),  # int32 is exact: R < 2^31
            S=torch.zeros(C, N, dtype=torch.float32, device=dev),
            Q=torch.zeros(C, N, dtype=torch.float32, device=dev),
        )
    if (masks is None) != (set_ids is None):
        raise UsageError("accumulate_mlp: masks and set_ids go together; pass both or neither")
    if masks is not None:
        _check_layer(masks, layer, N)
        op_args.update(
            keep=keep_mask(masks, layer, dev, torch.uint8),
            row_set=_set_ids(masks, set_ids, lead, dev),
        )
    h = act_and_record(gate, up, act_fn=act_fn, record=activation, **op_args)
    if stats is not None:
        _fold(stats, layer, op_args["K"], op_args["S"], op_args["Q"])
    return h


def mlp_forward(
    mlp: nn.Module,
    x: torch.Tensor,
    *,
    layer: int,
    stats: Stats | None = None,
    culture: torch.Tensor | int | None = None,
    weights: torch.Tensor | None = None,
    masks: Masks | None = None,
    set_ids: torch.Tensor | int | None = None,
    act_fn: str | None = None,
) -> torch.Tensor:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` of an HF gated MLP, recording and/or
    ablating in the same call (see :func:`accumulate_mlp`). The module is not modified.

    Args:
        mlp: a decoder layer's MLP with ``gate_proj``, ``up_proj``, ``down_proj`` (Llama, Qwen2,
            Mistral, Gemma3 and the VLMs built on them; see ``adapters.decoder_mlps``).
        x: ``[..., H]`` the MLP input.
        layer: its decoder layer index l.
        stats, culture, weights: record (``stats`` None = no recording).
        masks, set_ids: ablate (``set_ids`` ``[...]`` or a prefix, -1 = none).
        act_fn: ``"silu"``/``"gelu_tanh"``; default: the stats' fingerprint, or without
            ``stats`` the class of ``mlp.act_fn``.

    Returns:
        ``[..., H]`` the MLP output.
    """
    parts = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in parts):
        raise UsageError(
            f"mlp_forward needs a gated MLP (gate_proj, up_proj, down_proj), got "
            f"{type(mlp).__name__}; use adapters.decoder_mlps(model)[layer]"
        )
    gate_proj, up_proj, down_proj = parts
    if act_fn is None and stats is None:
        act_fn = _act_fn_of(mlp)
    h = accumulate_mlp(
        stats, layer, gate_proj(x), up_proj(x), culture, weights,
        act_fn=act_fn, masks=masks, set_ids=set_ids,
    )  # fmt: skip
    return down_proj(h)


def _act_fn_of(mlp: nn.Module) -> str:
    """``"silu"`` / ``"gelu_tanh"`` from the class of ``mlp.act_fn`` (transformers'
    ``SiLUActivation``, ``nn.SiLU``, ``GELUTanh``, ``PytorchGELUTanh``, ``NewGELUActivation``)."""
    name = type(getattr(mlp, "act_fn", None)).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    if "gelu" in name and ("tanh" in name or "new" in name):
        return "gelu_tanh"
    raise UsageError(
        f"cannot tell the activation of {type(mlp).__name__}.act_fn ({name}); pass "
        "act_fn=adapters.activation_fn(model) ('silu' or 'gelu_tanh')"
    )
