"""Statistics totals that stay on the device: what every recording path adds into.

Symbols: C cultures, L decoder layers, N neurons per layer.

    layer l:  K [C, N] int64, S [C, N] float64, Q [C, N] float64   contiguous, on layer l's device
    counts:   T [C] int64, items [C] int64                          on the row ids' device

A layer's totals are allocated (zeros) the first time a call reaches that layer on a device,
so the caller never says where its layers live (a model spread over GPUs works as is), and
they stay there: recording moves nothing to the host and never synchronises. :meth:`stats`
is the one device-to-host copy, into a CPU :class:`~culture_neurons.stats.Stats` (at paper
scale 25 x 28 x 18944 x 24 bytes = 318 MB). The :class:`~culture_neurons.instrument.Instrument`
keeps its totals here, and so can the functional API, nnsight and TransformerLens users::

    totals = Totals(cultures, models.fingerprint(model))
    ...  functional.accumulate(totals, l, a, culture, weights), count_tokens(totals, ...)
    stats = totals.stats()

Totals whose "cultures" are the item slots of one batch stage statistics until the caller knows
which items count (identification records only the items the model answers right, known once
the same forward's logits are): :meth:`Totals.add_slots` then adds the kept slots into their
cultures and zeroes the slots.
"""

from __future__ import annotations

import torch

from culture_neurons.errors import StatsMismatchError
from culture_neurons.instrument.rows import on_device
from culture_neurons.kernels.reduce import LayerSums
from culture_neurons.stats import ACTIVATIONS, SCOPES, Fingerprint, Stats, check_choice


class Totals:
    """Per-culture K, S, Q of every layer and T, items, on the devices where they are added.

    Args:
        cultures: C culture names; row culture ids index this list.
        fingerprint: the model's (``models.fingerprint(model)``): L layers x N neurons.
        activation: ``gate`` or ``post``, what the callers record (kept in the stats).
        scope: ``all`` / ``text`` / ``image`` / ``last``, which tokens the callers count.
        options: further settings stored in the stats (must agree for a merge).
    """

    def __init__(
        self,
        cultures: list[str],
        fingerprint: Fingerprint,
        activation: str = "gate",
        scope: str = "all",
        options: dict | None = None,
    ):
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("scope", scope, SCOPES)
        self.cultures = list(cultures)
        self.fingerprint = fingerprint
        self.activation, self.scope = activation, scope
        self.options = dict(options or {})
        # layer -> device -> (K, S, Q); device -> (T, items). Usually one device per layer.
        self._layers: list[dict[torch.device, tuple[torch.Tensor, ...]]] = [
            {} for _ in range(fingerprint.num_layers)
        ]
        self._counts: dict[torch.device, torch.Tensor] = {}  # device -> [2, C]: T, items
        self._base: Stats | None = None  # start_from: the start of totals not allocated yet

    @classmethod
    def like(cls, stats: Stats) -> Totals:
        """Empty totals with the cultures, model, activation, scope and options of ``stats``."""
        return cls(stats.cultures, stats.fingerprint, stats.activation, stats.scope, stats.options)

    def __repr__(self) -> str:
        devices = sorted({str(d) for per in self._layers for d in per} | {str(d) for d in self._counts})
        C, L, N = len(self.cultures), self.fingerprint.num_layers, self.fingerprint.num_neurons
        return (f"Totals({C} cultures x {L} layers x {N} neurons, {self.activation}, "
                f"on {', '.join(devices) or 'no device yet'})")  # fmt: skip

    # -- where calls add -----------------------------------------------------------------
    def layer(self, layer: int, device: torch.device | str) -> LayerSums:
        """``(K, S, Q)`` of ``layer`` on ``device``: contiguous int64 / fp64 / fp64 ``[C, N]``,
        updated in place by the caller (zeros, or the ``start_from`` values, at first use);
        ``.add(a, culture)`` adds rows (:class:`~culture_neurons.kernels.reduce.LayerSums`)."""
        device = _device(device)
        per = self._layers[layer]
        if device not in per:
            C, N = len(self.cultures), self.fingerprint.num_neurons
            K = torch.zeros(C, N, dtype=torch.int64, device=device)
            S = torch.zeros(C, N, dtype=torch.float64, device=device)
            Q = torch.zeros(C, N, dtype=torch.float64, device=device)
            if self._base is not None and not per:  # the base goes into one device's totals
                for name, mine in zip("KSQ", (K, S, Q), strict=True):
                    mine.copy_(getattr(self._base, name)[:, layer])
            per[device] = LayerSums(K, S, Q)
        return per[device]

    def counts(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, items)`` int64 ``[C]`` on ``device``, updated in place by the caller (the
        rows of :meth:`count_block`)."""
        block = self.count_block(device)
        return block[0], block[1]

    def count_block(self, device: torch.device | str) -> torch.Tensor:
        """int64 ``[2, C]`` on ``device``: row 0 is T, row 1 items (one add per forward:
        :func:`~culture_neurons.instrument.rows.item_counts` gives this layout)."""
        device = _device(device)
        if device not in self._counts:
            block = torch.zeros(2, len(self.cultures), dtype=torch.int64, device=device)
            if self._base is not None and not self._counts:
                block[0].copy_(self._base.T)
                block[1].copy_(self._base.items)
            self._counts[device] = block
        return self._counts[device]

    def add_slots(self, slots: Totals, culture: torch.Tensor, keep: torch.Tensor) -> None:
        """Add slot ``b`` of ``slots`` (statistics staged per item, ``slots.cultures`` being
        slot names) into culture ``culture[b]`` wherever ``keep[b]``, T and items included
        (one item per kept slot), then zero ``slots``.

        Args:
            slots: totals of the same model with one "culture" per slot, at least B of them.
            culture: int ``[B]``, slot b's culture (-1 = none: never added).
            keep: bool ``[B]``, on any device (moved without waiting, as the ids of
                :mod:`culture_neurons.instrument.rows`; nothing is read back).

        Each device's slots are added where they are (``index_add_`` of ``[B, N]`` per
        statistic and layer), so nothing moves to the host and nothing synchronises.
        """
        B = culture.numel()
        kept: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def on(device):  # (slots that do not count [B, 1], the slots' cultures [B]), once
            if device not in kept:
                c = on_device(culture.reshape(-1), device).long()
                take = on_device(keep.reshape(-1), device).bool() & (c >= 0)
                kept[device] = ~take[:, None], c.clamp(min=0)
            return kept[device]

        for layer, per in enumerate(slots._layers):
            for device, sums in per.items():
                drop, idx = on(device)
                for src, dst in zip(sums, self.layer(layer, device), strict=True):
                    part = src[:B]
                    part.masked_fill_(drop, 0)  # a dropped slot adds zeros: no sync to count
                    dst.index_add_(0, idx, part)
                    src.zero_()
        for device, (T_slots, items_slots) in slots._counts.items():
            drop, idx = on(device)
            T, items = self.counts(device)
            T.index_add_(0, idx, T_slots[:B].masked_fill(drop[:, 0], 0))
            items.index_add_(0, idx, (~drop[:, 0]).long())
            T_slots.zero_()
            items_slots.zero_()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero every total in place (tensors handed out by :meth:`layer` stay valid)."""
        self._base = None
        for per in self._layers:
            for sums in per.values():
                for t in sums:
                    t.zero_()
        for counts in self._counts.values():
            for t in counts:
                t.zero_()

    def start_from(self, stats: Stats) -> None:
        """Continue from ``stats`` (e.g. a checkpoint of this same recording): accumulation
        then goes on from those values, so the totals equal, bit for bit, those of a run that
        was never interrupted.

        Raises:
            StatsMismatchError: ``stats`` differ in model, cultures, activation, scope or options.
        """
        bad = Stats.mismatches(self, stats)  # reads only the fields Totals shares with Stats
        if bad:
            raise StatsMismatchError("cannot continue from stats that differ in " + "; ".join(bad))
        self.reset()
        self._base = stats.to("cpu", copy=True)  # a snapshot: the caller may go on changing theirs
        # Totals already handed out take the base now (the first device of each), the rest at
        # their first use.
        for layer, per in enumerate(self._layers):
            for sums in list(per.values())[:1]:
                for name, mine in zip("KSQ", sums, strict=True):
                    mine.copy_(getattr(stats, name)[:, layer])
        for T, items in list(self._counts.values())[:1]:
            T.copy_(stats.T)
            items.copy_(stats.items)

    # -- results -------------------------------------------------------------------------
    def stats(self) -> Stats:
        """The totals so far as a CPU :class:`Stats` (the one device-to-host copy; the totals
        stay where they are). A layer no call reached holds zeros (or its ``start_from``)."""
        if self._base is not None:
            out = self._base.to("cpu", copy=True)
            out.shard = None
        else:
            out = Stats.zeros(self.cultures, self.fingerprint, self.activation, self.scope,
                              self.options)  # fmt: skip
        for layer, per in enumerate(self._layers):
            for i, sums in enumerate(per.values()):
                for name, src in zip("KSQ", sums, strict=True):
                    _gather(getattr(out, name)[:, layer], src, first=i == 0)
        for i, (T, items) in enumerate(self._counts.values()):
            _gather(out.T, T, first=i == 0)
            _gather(out.items, items, first=i == 0)
        return out


def _device(device: torch.device | str) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:0"), as tensors report theirs: one key each."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _gather(dst: torch.Tensor, src: torch.Tensor, first: bool) -> None:
    """``dst`` (CPU) takes ``src`` (the first device's, which holds any base) or adds it."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src.cpu())
