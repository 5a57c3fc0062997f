"""The functional API: record and ablate inside someone else's forward code, no model patching.

For libraries that already own the forward pass (nnsight, TransformerLens, pyvene, a custom
loop): they hand us each decoder layer's MLP activations and we add their statistics into a
:class:`~culture_neurons.instrument.totals.Totals` or zero the neurons of a
:class:`~culture_neurons.masks.Masks` set. Same numbers as
:class:`~culture_neurons.instrument.Instrument` (SPEC "Definitions").

Symbols: C cultures, L layers, N neurons per layer, S mask sets; ``[...]`` are the caller's
leading dims (e.g. ``[B, T]``), each position one token row.

Per-row arguments share one convention. ``culture`` holds culture ids (``-1`` = not counted),
``set_ids`` ablation-set ids (``-1`` = no ablation), ``weights`` 0/1 token weights (0 = not
counted; e.g. the ``attention_mask``). Each may be given for every row (``[...]``) or for a
prefix of the leading dims (``[B]`` per item for ``[B, T, N]`` activations), and is then
repeated over the remaining dims. An int applies to every row.

Counting tokens happens once per forward, not once per layer, so it is its own call::

    totals = Totals(cultures, fingerprint(model), activation="gate")
    for batch, item_culture in loader:                 # item_culture [B]
        w = batch["attention_mask"]                    # [B, T]
        count_tokens(totals, item_culture, w)          # T += counted tokens (once)
        count_items(totals, item_culture)              # items += 1 per item (once)
        ... in the forward, for every layer l:
        accumulate(totals, l, a_l, item_culture, w)    # K, S, Q of layer l (a_l [B, T, N])
    stats = totals.stats()                             # the one copy to the host

or, from the MLP's pre-activations, with the fused op (the activations are not written out
for the statistics on CUDA)::

        h = accumulate_mlp(totals, l, gate_proj(x), up_proj(x), item_culture, w)
        y = down_proj(h)

``mlp_forward(mlp, x, ...)`` does the whole gated MLP of one HF decoder layer, recording and/or
ablating. Every statistic goes through :mod:`culture_neurons.kernels.reduce` (or the fused
op on CUDA), as the Instrument's do: counts exact int64, sums fp32 within a row chunk then fp64.

Where things live. A :class:`Totals` keeps each layer's ``[C, N]`` totals on the device of
that layer's activations and ``T``/``items`` on the ids' device; no call copies to the host,
synchronises or builds per-token storage, so at paper scale a forward costs what the
reduction costs. Keep masks are built once per (masks, layer, device) and cached while the
masks live. Ids given on the CPU go to the device without a blocking copy (rows.on_device);
per-row ids built once per forward (``row_ids(culture, lead, weights)``) and passed as
``culture`` save rebuilding them in every layer.

A plain :class:`~culture_neurons.stats.Stats` is still accepted where a Totals is, at a cost:
each call adds into fresh ``[C, N]`` device totals and then into the Stats' ``[C, L, N]``
slice on its device; with a CPU Stats and GPU activations that is a device-to-host copy and a
sync per layer per call (3 x 25 x 18944 x 8 B = 11 MB per layer, 318 MB per 28-layer forward at
paper scale).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from culture_neurons.errors import StatsMismatchError, UsageError
from culture_neurons.instrument.rows import check_ids, count_per_culture, per_row, row_ids
from culture_neurons.instrument.totals import Totals
from culture_neurons.kernels import reduce
from culture_neurons.kernels.ops import ACT_FNS, act_and_record
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.stats import ACTIVATIONS, Stats

__all__ = [
    "Totals",
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

Target = Totals | Stats  # where statistics are added: Totals (on the device) or Stats (a fold)


# --- token and item counts (once per forward) --------------------------------------------------


def _add_counts(target: Target, which: int, counts: torch.Tensor) -> None:
    """``T`` (``which`` 0) or ``items`` (1) of ``target`` += ``counts [C]`` (on its device)."""
    if isinstance(target, Totals):
        target.counts(counts.device)[which].add_(counts)
    else:
        dst = target.T if which == 0 else target.items
        dst += counts.to(dst.device)


def count_tokens(
    totals: Target, culture: torch.Tensor | int, weights: torch.Tensor | None = None
) -> None:
    """``T[c] += number of counted rows of culture c``, in place. Call ONCE per forward.

    Args:
        totals: the :class:`Totals` (or Stats) to add into.
        culture: ``[...]`` culture id per row, or per item (a prefix of weights' shape, e.g.
            ``[B]`` with weights ``[B, T]``); -1 = not counted.
        weights: ``[...]`` 0/1 token weights (e.g. the attention mask ``[B, T]``); None: every
            row of ``culture`` counts once.

    The rows counted here must be the rows passed to :func:`accumulate` for every layer,
    otherwise ``P = K / T`` is not a probability. The count stays on the ids' device
    (``weights``' when given).
    """
    culture = torch.as_tensor(culture)
    lead = weights.shape if weights is not None else culture.shape
    device = weights.device if weights is not None else culture.device
    ids = row_ids(culture, lead, weights, device=device)
    C = len(totals.cultures)
    check_ids(ids, C, "culture", "not counted")
    _add_counts(totals, 0, count_per_culture(ids, C))


def count_items(totals: Target, item_culture: torch.Tensor | list[int]) -> None:
    """``items[c] += number of items (prompts) of culture c``, in place. Call ONCE per forward.

    Args:
        item_culture: ``[B]`` culture id per item, -1 = not counted.
    """
    ids = torch.as_tensor(item_culture).reshape(-1)
    C = len(totals.cultures)
    check_ids(ids, C, "culture", "not counted")
    _add_counts(totals, 1, count_per_culture(ids, C))


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


def _sums(target: Target, layer: int, device: torch.device):
    """``(K, S, Q)`` contiguous ``[C, N]`` on ``device`` for one call to add into, and what is
    left to do after the call: nothing for a Totals (they are its own totals), the fold into
    the Stats' ``[C, L, N]`` slice for a Stats (the compatibility cost, see the module doc)."""
    if isinstance(target, Totals):
        return target.layer(layer, device), None
    C, N = len(target.cultures), target.fingerprint.num_neurons
    sums = (torch.zeros(C, N, dtype=torch.int64, device=device),
            torch.zeros(C, N, dtype=torch.float64, device=device),
            torch.zeros(C, N, dtype=torch.float64, device=device))  # fmt: skip

    def fold() -> None:
        for name, part in zip("KSQ", sums, strict=True):
            dst = getattr(target, name)[:, layer]
            dst += part.to(dst.device)

    return sums, fold


def accumulate(
    totals: Target,
    layer: int,
    a: torch.Tensor,
    culture: torch.Tensor | int,
    weights: torch.Tensor | None = None,
) -> None:
    """Add the statistics of activations ``a`` of decoder layer ``layer`` into ``totals``.

    ``K[c, layer, n] += #rows of c with a > 0``, ``S[c, layer, n] += sum a``,
    ``Q[c, layer, n] += sum a^2``: counts exact (int64), sums fp32 per row chunk then fp64,
    on ``a``'s device. ``T`` and ``items`` are not touched (see :func:`count_tokens`,
    :func:`count_items`): a forward visits every layer.

    Args:
        totals: a :class:`Totals` of C cultures over this model's L x N neurons (or a Stats,
            at the cost the module doc states).
        layer: decoder layer index l in [0, L).
        a: ``[..., N]`` the recorded activation, any float dtype and device. It must be what
            ``totals.activation`` names: ``"gate"`` = ``act_fn(gate_proj(x))``, ``"post"`` =
            ``act_fn(gate_proj(x)) * up_proj(x)`` (the input of down_proj).
        culture: ``[...]`` (or a prefix, e.g. ``[B]``) culture ids, -1 = not counted.
        weights: ``[...]`` (or a prefix) 0/1 token weights, None = all 1.

    Raises:
        UsageError: layer out of range, ids out of range, shapes that do not fit.
        StatsMismatchError: ``a`` has another N than the model of ``totals``.
    """
    N = a.shape[-1]
    _check_layer(totals, layer, N)
    ids = row_ids(culture, a.shape[:-1], weights, device=a.device).reshape(-1)
    check_ids(ids, len(totals.cultures), "culture", "not counted")
    (K, S, Q), fold = _sums(totals, layer, a.device)
    reduce.accumulate(K, S, Q, a.reshape(-1, N), ids)
    if fold is not None:
        fold()


# --- ablation ----------------------------------------------------------------------------------


class _KeepMasks:
    """Keep masks built once per (masks, layer, device, dtype) and kept while the masks live:
    a call never rebuilds one (the CSR walk and the host-to-device copy happen once)."""

    def __init__(self):
        self._by_masks: dict[int, tuple[weakref.ref, dict]] = {}

    def get(self, masks: Masks, layer: int, device, dtype: torch.dtype) -> torch.Tensor:
        entry = self._by_masks.get(id(masks))
        if entry is None or entry[0]() is not masks:
            ref = weakref.ref(masks, self._forget)
            entry = self._by_masks[id(masks)] = (ref, {})
        built, key = entry[1], (layer, torch.device(device), dtype)
        if key not in built:
            built[key] = masks.keep_mask(device=device, dtype=dtype, layer=layer)
        return built[key]

    def _forget(self, ref: weakref.ref) -> None:
        for key, (mine, _) in list(self._by_masks.items()):
            if mine is ref:
                del self._by_masks[key]


_KEEP = _KeepMasks()


def keep_mask(
    masks: Masks, layer: int, device: torch.device | str = "cpu", dtype=torch.bool
) -> torch.Tensor:
    """``dtype [S, N]`` keep mask of one layer: 0 where set s ablates neuron (layer, n), else 1.

    Built from the CSR entries of that layer only (O(selected) work), once per (masks, layer,
    device, dtype): later calls return the same tensor (shared: do not modify it; a Masks is
    taken as fixed once used).
    """
    _check_layer(masks, layer, masks.num_neurons)
    return _KEEP.get(masks, layer, device, dtype)


def _set_ids(masks: Masks, set_ids, lead: torch.Size, device) -> torch.Tensor:
    """int64 ``[...]`` set id per row (-1 = none), checked against the masks' S sets."""
    ids = per_row(set_ids, lead, "set_ids", device)
    return check_ids(ids, len(masks), "set", "no ablation").long()


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
    ids = _set_ids(masks, set_ids, h.shape[:-1], h.device).reshape(-1)
    keep = keep_mask(masks, layer, h.device, torch.uint8)
    return reduce.ablate(h.reshape(-1, h.shape[-1]), keep, ids).view(h.shape)


def ablate_(h: torch.Tensor, masks: Masks, layer: int, set_ids: torch.Tensor | int) -> torch.Tensor:
    """:func:`ablate` in place on ``h`` (no copy of the activations); returns ``h``."""
    _check_layer(masks, layer, h.shape[-1])
    ids = _set_ids(masks, set_ids, h.shape[:-1], h.device).reshape(-1)
    keep = keep_mask(masks, layer, h.device, torch.uint8)
    reduce.ablate_(h.view(-1, h.shape[-1]), keep, ids)
    return h


# --- the fused path ----------------------------------------------------------------------------


def _mode(totals: Target | None, act_fn: str | None, activation: str | None) -> tuple[str, str]:
    """(act_fn, activation), defaulting to what ``totals`` record; refuses a contradiction."""
    if totals is not None:
        for name, given, recorded in (
            ("act_fn", act_fn, totals.fingerprint.act_fn),
            ("activation", activation, totals.activation),
        ):
            if given is not None and given != recorded:
                raise StatsMismatchError(
                    f"{name}={given!r} but these totals record {name} {recorded!r}; leave "
                    f"{name} unset or record into totals made with {name}={given!r}"
                )
        return totals.fingerprint.act_fn, totals.activation
    act_fn = act_fn or "silu"
    if act_fn not in ACT_FNS:
        raise UsageError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")
    return act_fn, activation or "gate"


def accumulate_mlp(
    totals: Target | None,
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
    ``a`` (``totals.activation``: ``act(gate)`` or ``h``) are taken in the same pass, straight
    into the layer's totals on gate's device, and ``masks``/``set_ids`` ablate per row (the
    statistics then see the ablated values, as the Instrument does). Sums are fp32 within a
    tile or chunk, then fp64; counts are exact.

    Args:
        totals: the :class:`Totals` (or a Stats, at the cost the module doc states) where
            K, S, Q go (not T: see :func:`count_tokens`); None = no recording.
        layer: decoder layer index l in [0, L).
        gate: ``[..., N]`` ``gate_proj(x)``, fp32/fp16/bf16.
        up: ``[..., N]`` ``up_proj(x)``, same shape and dtype.
        culture: ``[...]`` (or a prefix) culture ids, -1 = not counted; needed with ``totals``.
        weights: ``[...]`` (or a prefix) 0/1 token weights, None = all 1.
        act_fn: ``"silu"``/``"gelu_tanh"``; default and only allowed value with ``totals``:
            the fingerprint's.
        activation: ``"gate"``/``"post"``; default and only allowed value with ``totals``:
            theirs.
        masks, set_ids: ablate ``set_ids`` rows' sets (``[...]`` or a prefix, -1 = none).

    Returns:
        ``h`` ``[..., N]`` in gate's dtype.
    """
    act_fn, activation = _mode(totals, act_fn, activation)
    if activation not in ACTIVATIONS:
        raise UsageError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    lead, N, dev = gate.shape[:-1], gate.shape[-1], gate.device
    op_args, fold = {}, None
    if totals is not None:
        if culture is None:
            raise UsageError("accumulate_mlp: totals given without culture ids; pass culture")
        _check_layer(totals, layer, N)
        ids = row_ids(culture, lead, weights, device=dev)
        check_ids(ids, len(totals.cultures), "culture", "not counted")
        (K, S, Q), fold = _sums(totals, layer, dev)
        op_args.update(culture=ids, K=K, S=S, Q=Q)
    if (masks is None) != (set_ids is None):
        raise UsageError("accumulate_mlp: masks and set_ids go together; pass both or neither")
    if masks is not None:
        _check_layer(masks, layer, N)
        op_args.update(keep=keep_mask(masks, layer, dev, torch.uint8),
                       set_ids=_set_ids(masks, set_ids, lead, dev))  # fmt: skip
    h = act_and_record(gate, up, act_fn=act_fn, activation=activation, **op_args)
    if fold is not None:
        fold()
    return h


def mlp_forward(
    mlp: nn.Module,
    x: torch.Tensor,
    *,
    layer: int,
    totals: Target | None = None,
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
            Mistral, Gemma3 and the VLMs built on them; see ``models.decoder_mlps``).
        x: ``[..., H]`` the MLP input.
        layer: its decoder layer index l.
        totals, culture, weights: record (``totals`` None = no recording).
        masks, set_ids: ablate (``set_ids`` ``[...]`` or a prefix, -1 = none).
        act_fn: ``"silu"``/``"gelu_tanh"``; default: the totals' fingerprint, or without
            ``totals`` the activation of ``mlp.act_fn`` (``models.mlp_activation``).

    Returns:
        ``[..., H]`` the MLP output.
    """
    projections = adapters.MLP_PARTS[:3]
    if adapters.missing_mlp_parts(mlp, projections):
        raise UsageError(
            f"mlp_forward needs a gated MLP ({', '.join(projections)}), got "
            f"{type(mlp).__name__}; use models.decoder_mlps(model)[layer]"
        )
    if act_fn is None and totals is None:
        act_fn = adapters.mlp_activation(mlp)
    h = accumulate_mlp(
        totals, layer, *adapters.gate_up(mlp, x), culture, weights,
        act_fn=act_fn, masks=masks, set_ids=set_ids,
    )  # fmt: skip
    return adapters.down(mlp, h)
