"""Attach to a model's decoder MLPs to record per-culture statistics and/or ablate neurons.

One :class:`Instrument` serves both jobs because the fused kernel does both in one pass
(and steers instead of ablating with ``alpha``: ``a := (1 + alpha) a``, alpha = -1 ablates):
every flattened token row carries a culture id (``-1`` = not counted) and an ablation-set id
(``set_ids``, ``-1`` = no ablation). A batch may mix cultures and sets freely, so a whole
source-by-target ablation matrix runs in few passes.

    with culture_neurons.record(model, cultures=["ja", "mx"]) as rec:
        for batch, culture in loader:                 # culture: one id (or name) per row
            rec(culture, **batch)                     # = rec.set_batch(...); model(**batch)
    stats = rec.stats()

Staging (``set_batch(..., stage=True)``): the rows' statistics go into per-item slots instead
of the totals, and :meth:`Instrument.commit` adds the items it is told to keep, once the caller
knows which (identification counts the items the model answers right, known from the logits
of the very forward that recorded them: one prefill per item)::

    rec.set_batch(culture, stage=True, **batch)
    logits = model(**batch).logits
    rec.commit(predicted == label)                   # bool [B]: which items count

Backends (``rec.backend``): ``hooks`` (plain PyTorch forward hooks, the reference) and
``fused`` (the MLP forward replaced on the instance by one fused op; see ``fused.py``). Both
add straight into int64 / fp64 totals on each layer's device; nothing moves to the host until
:meth:`Instrument.stats`. Patching is per instance, never per class; detaching restores the
model exactly. A model carries at most one Instrument at a time (a second is refused, naming
the live one): one Instrument records and ablates at once.
"""

from __future__ import annotations

import importlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from culture_neurons.errors import UsageError
from culture_neurons.instrument.rows import (
    check_id_range,
    check_ids,
    item_rows,
    on_device,
    token_weights,
)
from culture_neurons.instrument.totals import Totals
from culture_neurons.models import adapters
from culture_neurons.stats import ACTIVATIONS, Stats, check_choice

log = logging.getLogger(__name__)
BACKENDS = ("auto", "hooks", "fused")


def auto_backend(device: torch.device) -> str:
    """What ``backend="auto"`` runs on ``device`` (a model's first decoder layer's). On CUDA the
    fused Triton kernel; elsewhere plain hooks, which leave the MLP to PyTorch: both reduce
    through the same C++ call per layer there, so they cost about the same per forward, but
    the fused CPU path holds one chunk of the MLP above the plain forward's peak and hooks
    nothing (bench/RESULTS.md, "Recording on the CPU")."""
    return "fused" if torch.device(device).type == "cuda" else "hooks"
_OWNER = "_culture_neurons_instrument"  # attribute on each instrumented MLP: weakref to its owner


@dataclass
class Batch:
    """Per-row state of the forward(s) about to run. Every tensor stays on the device it was
    given or built on (the inputs' for rows): describing a batch never synchronises."""

    batch_size: int  # B
    rows: int  # B*T of the prompt: a recorded forward must have exactly these token rows
    culture: torch.Tensor | None  # int32 [B*T] on the inputs' device, -1 = not counted
    set_ids: torch.Tensor | None  # int32 [B], -1 = no ablation; None = none
    serial: int
    # int64 [2, C] on the culture ids' device: counted tokens and items per culture (staged:
    # per item slot, whose items commit() counts); added when layer 0 runs. None: no culture.
    counts: torch.Tensor | None
    # The only culture id among the rows when the ids given on the CPU show it (then the fused
    # kernel skips its per-tile search); -1: several, none, ids given on a device, or the hooks
    # backend (which never reads it, so it is not looked for).
    one_culture: int = -1
    # Staged (set_batch(stage=True)): int64 [B] culture of each item; the rows' ids above are
    # then item slots 0..B-1, their statistics held until commit(). None: not staged.
    staged: torch.Tensor | None = None
    ran: bool = False  # layer 0 has seen this batch (its counts are committed or staged)
    _cache: dict = field(default_factory=dict)

    def on(self, device: torch.device, tokens_per_row: int):
        """(culture [B*T], set ids [B*T]) on ``device``; moved once per device and length
        (layers may sit on several devices; generate() runs one token per row at a time)."""
        key = (device, tokens_per_row)
        if key not in self._cache:
            culture = None if self.culture is None else self.culture.to(device, non_blocking=True)
            set_ids = None
            if self.set_ids is not None:
                ids = self.set_ids.to(device, non_blocking=True)
                set_ids = ids[:, None].expand(self.batch_size, tokens_per_row).reshape(-1)
            self._cache[key] = (culture, set_ids)
        return self._cache[key]


class Site:
    """One decoder MLP: its layer, its statistics totals and its slice of the ablation masks."""

    def __init__(self, inst: Instrument, layer: int, mlp: nn.Module):
        self.inst, self.layer, self.mlp = inst, layer, mlp
        self.device = adapters.gate_weight(mlp).device
        self.last_serial = -1
        self.current = None  # (culture, set ids) of the forward in progress
        # (K, S, Q): int64 / float64 / float64 [C, N] on this layer's device (inst.totals'),
        # a LayerSums, if recording
        self.layer_totals = None
        # where the forward in progress adds: layer_totals, or the staging slots' [B', N]
        self.sums = None
        self.keep = None  # uint8 [S, N] keep mask of this layer (0 = ablate), if ablating

    def begin(self, x: torch.Tensor):
        """(culture, set ids) per token row of this MLP input ``x`` ``[B, T, H]``, each None
        when unused; checks that a recorded batch runs once, on the prompt it described."""
        batch = self.inst._batch
        if batch is None:
            if self.inst.recording:
                raise UsageError(
                    "the model ran while instrumented for recording but no rows were set; call "
                    "set_batch(culture, input_ids=..., attention_mask=...) before each forward"
                )
            self.current = (None, None)
            return self.current
        rows = x.numel() // x.shape[-1]
        if batch.culture is not None:
            if rows != batch.rows:
                raise UsageError(
                    f"layer {self.layer} MLP got {rows} token rows but set_batch described "
                    f"{batch.rows}; recording works on full prompt forwards (not generate() "
                    "with a KV cache), one set_batch per forward"
                )
            if batch.serial == self.last_serial:
                raise UsageError(
                    "the model ran twice for one set_batch; call set_batch before every forward"
                )
        elif rows % batch.batch_size:
            raise UsageError(
                f"layer {self.layer} MLP got {rows} token rows, not a multiple of the "
                f"{batch.batch_size} rows given to set_batch"
            )
        if self.layer == 0 and batch.serial != self.last_serial:
            self.inst._commit_counts(batch)
        self.last_serial = batch.serial
        if batch.culture is not None:
            staging = self.inst._staging
            self.sums = self.layer_totals if batch.staged is None else \
                staging.layer(self.layer, self.device)  # fmt: skip
        self.current = batch.on(x.device, rows // batch.batch_size)
        return self.current


class Instrument:
    """Records statistics (``cultures`` given) and/or ablates (``masks`` given); see module doc.

    Args:
        model: a HF model of a supported family (see :mod:`culture_neurons.models`).
        cultures: C culture names, the rows' culture ids index this list.
        masks: a :class:`culture_neurons.masks.Masks` of S sets; the rows' ``set_ids`` index it.
        alpha: the intervention on a row's set's neurons, ``a := (1 + alpha) a``: ``-1``
            (default) ablates (exactly 0, SPEC's ``a := 0``), e.g. ``0.5`` amplifies by half.
        activation: ``gate`` (``act(gate_proj(x))``) or ``post`` (``act(...) * up_proj(x)``).
        scope: ``all`` / ``text`` / ``image`` / ``last``: which tokens count.
        backend: ``auto`` (:func:`auto_backend`: fused on CUDA, hooks elsewhere), ``fused``
            or ``hooks``.
        options: further settings stored in the stats (must agree for a merge).

    Raises:
        UsageError: the model already carries a live Instrument (detach it first, or record
            and ablate with one Instrument given both ``cultures`` and ``masks``).
    """

    def __init__(
        self,
        model: nn.Module,
        cultures: list[str] | None = None,
        masks=None,
        *,
        activation: str = "gate",
        scope: str = "all",
        backend: str = "auto",
        options: dict | None = None,
        alpha: float = -1.0,
    ):
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        if cultures is None and masks is None:
            raise UsageError("give cultures (to record), masks (to ablate), or both")
        self.model = model
        self.fingerprint = adapters.fingerprint(model)
        self.act_fn = adapters.activation_fn(model)
        self.image_token_ids = adapters.image_token_ids(model)
        self.cultures = list(cultures) if cultures is not None else None
        self.masks = masks
        self.activation, self.scope = activation, scope
        self.alpha = float(alpha)
        self.factor = 1.0 + self.alpha  # what selected neurons are multiplied by (0: ablation)
        self.options = dict(options or {})
        self._batch: Batch | None = None
        self._serial = 0
        self._staging: Totals | None = None  # per-item slots of staged batches (see set_batch)
        self._staged: Batch | None = None  # the staged batch awaiting commit()
        self.sites = [Site(self, i, mlp) for i, mlp in enumerate(adapters.decoder_mlps(model))]
        refuse_live_instrument([site.mlp for site in self.sites],
                               "a model carries one Instrument at a time",
                               alternative=", or record and ablate with one "
                               "Instrument(model, cultures=..., masks=...)")  # fmt: skip
        if masks is not None:
            masks.require_model(self.fingerprint, "these masks")
            keep = masks.keep_mask(device="cpu", dtype=torch.uint8)  # [L, S, N]
            for site in self.sites:  # built once per attach, on each layer's device
                site.keep = keep[site.layer].to(site.device)
        self.totals = None
        if self.recording:
            self.totals = Totals(self.cultures, self.fingerprint, activation, scope, self.options)
            for site in self.sites:  # on each layer's device, for the life of the Instrument
                site.layer_totals = self.totals.layer(site.layer, site.device)
        self.backend = auto_backend(self.sites[0].device) if backend == "auto" else backend
        self._impl = importlib.import_module(f"culture_neurons.instrument.{self.backend}")
        self._impl = self._impl.attach(self)
        for site in self.sites:  # so that print(model) shows what is instrumented
            setattr(site.mlp, _OWNER, weakref.ref(self))
            site.mlp.extra_repr = lambda b=self.backend: f"[culture_neurons: {b} backend]"
        log.info("instrumented %d decoder MLPs with the %s backend", len(self.sites), self.backend)

    def __repr__(self) -> str:
        jobs = []
        if self.recording:
            jobs.append(f"recording {len(self.cultures)} cultures")
        if self.masks is not None:
            verb = "ablating" if self.factor == 0.0 else f"steering (alpha {self.alpha:g})"
            jobs.append(f"{verb} {len(self.masks)} sets")
        state = "attached" if self.attached else "detached"
        return f"Instrument({', '.join(jobs)}, {self.backend} backend, {state})"

    # -- state ---------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self.cultures is not None

    @property
    def attached(self) -> bool:
        return self._impl is not None

    def reset_stats(self) -> None:
        """Zero the totals in place (the attached model is unchanged; the backends' per-layer
        ops, bound to them at attach, stay valid); a staged batch is dropped."""
        if self.recording:
            self.totals.reset()
        self._drop_staged()

    def start_from(self, stats: Stats) -> None:
        """Continue accumulating from ``stats`` (a checkpoint of this same recording): the
        totals then equal, bit for bit, those of a run that was never interrupted."""
        if not self.recording:
            raise UsageError("this instrument does not record (no cultures were given)")
        self.totals.start_from(stats)
        self._drop_staged()

    # -- per batch -----------------------------------------------------------------------
    def set_batch(
        self,
        culture=None,
        *,
        set_ids=None,
        stage: bool = False,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_unused,
    ) -> None:
        """Describe the next forward: one culture id (or name) per row, -1 = not counted;
        ``set_ids``: one mask-set id per row, -1 = none. Token weights come from
        ``attention_mask`` (padding) and ``input_ids`` (image tokens) under the scope.

        ``stage=True``: the forward's statistics are held per item (row) until
        :meth:`commit` says which items count; until then they are in no total.

        Raises:
            UsageError: ``stage=True`` without cultures, or while a staged batch that ran
                awaits its :meth:`commit`.
        """
        if "ablate" in _unused:  # the keyword before set_ids: never ignore an ablation silently
            raise UsageError("set_batch(ablate=...) is now set_batch(set_ids=...): one mask-set "
                             "id per row, -1 = none")  # fmt: skip
        if input_ids is None and attention_mask is None:
            raise UsageError("set_batch needs input_ids or attention_mask to know the rows")
        shape = (input_ids if input_ids is not None else attention_mask).shape
        rows = counts = staged = None
        one_culture = -1
        if stage and culture is None:
            raise UsageError("set_batch(stage=True) stages the statistics of recorded rows; give "
                             "their cultures (one id or name per row)")  # fmt: skip
        if culture is not None:
            if not self.recording:
                raise UsageError("this instrument was built without cultures; it cannot record")
            weights = token_weights(attention_mask, input_ids, self.scope, self.image_token_ids)
            ids, one_culture = self._culture_ids(culture, shape[0], weights.device)
            groups = len(self.cultures)
            if stage:
                staged = on_device(ids, weights.device)
                ids, one_culture = self._slots(staged), -1
                groups = len(self._staging.cultures)
            rows, counts = item_rows(ids, weights, groups)
        ablation = None
        if set_ids is not None:
            if self.masks is None:
                raise UsageError("this instrument was built without masks; it cannot ablate")
            ablation = self._set_ids(set_ids, shape[0])
        self._serial += 1
        self._batch = Batch(shape[0], shape[0] * shape[1], rows, ablation, self._serial, counts,
                            one_culture, staged)  # fmt: skip
        if stage:
            self._staged = self._batch

    def commit(self, keep) -> None:
        """Add the staged batch's items where ``keep`` (bool ``[B]``, one per row given to
        ``set_batch(stage=True)``; a tensor on any device or a list) into the totals, T and
        items included; the others are dropped. Nothing is read back to the host.

        Raises:
            UsageError: nothing staged, the staged batch never ran, or ``keep`` not ``[B]``.
        """
        batch = self._staged
        if batch is None or not batch.ran:
            raise UsageError("commit() adds a staged batch after its forward: call "
                             "set_batch(culture, stage=True, ...), run the model, then "
                             "commit(keep)" + ("" if batch is None else
                                               "; the staged batch has not run yet"))  # fmt: skip
        keep = torch.as_tensor(keep)
        if keep.numel() != batch.batch_size or keep.is_floating_point():
            raise UsageError(f"commit(keep) takes one bool per row of the staged batch "
                             f"({batch.batch_size}), got {keep.numel()} {keep.dtype} values")  # fmt: skip
        self.totals.add_slots(self._staging, batch.staged, keep)
        self._staged = None

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot ids ``[B]`` for a staged batch (row b -> slot b, -1 where ``ids`` is -1), the
        staging slots grown to B if needed; refuses while a staged batch awaits commit."""
        pending = self._staged
        if pending is not None and pending.ran:
            raise UsageError(
                "the previous staged batch ran but was not committed: call commit(keep) first "
                "(all False drops it)"
            )
        B = ids.numel()
        if self._staging is None or len(self._staging.cultures) < B:
            # New slot totals (the old ones hold nothing: every staged batch that ran was
            # committed, which zeroes them); the fused ops bound to the old ones rebind.
            self._staging = Totals([f"slot{b}" for b in range(B)], self.fingerprint,
                                   self.activation, self.scope)  # fmt: skip
        slots = torch.arange(B, device=ids.device)
        return torch.where(ids >= 0, slots, -1)

    def _drop_staged(self) -> None:
        if self._staging is not None:
            self._staging.reset()
        self._staged = None

    def clear_batch(self) -> None:
        """Forget the rows set by set_batch (the next forward must set its own)."""
        self._batch = None

    def __call__(self, culture=None, *, set_ids=None, **inputs):
        """``set_batch(culture, set_ids=..., **inputs)`` then ``model(**inputs)``."""
        self.set_batch(culture, set_ids=set_ids, **inputs)
        try:
            return self.model(**inputs)
        finally:
            self.clear_batch()

    def generate(self, *, set_ids=None, **kwargs):
        """``model.generate(**kwargs)`` with rows ablated by ``set_ids`` throughout (ablation
        only: statistics are recorded on prompt forwards)."""
        self.set_batch(None, set_ids=set_ids, **kwargs)
        try:
            return self.model.generate(**kwargs)
        finally:
            self.clear_batch()

    def _culture_ids(self, culture, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor | list[int], int]:  # fmt: skip
        """The [B] culture ids from names or ids (one value applies to every row): Python ints
        where they were given as names or ints (:func:`item_rows` takes them as they are),
        else int64 on ``device``; and the only id among them for the fused kernel (-1: several
        or none; not looked for by the hooks backend). Values are checked where they are on the
        CPU; ids given on a device are neither read nor copied back (no sync), and their only
        id is then unknown (-1)."""
        if isinstance(culture, (str, int)):
            culture = [culture] * batch_size
        if isinstance(culture, (list, tuple)):  # checked as Python ints: no tensor op
            culture = [c if type(c) is int else self._culture_id(c) for c in culture]
            self._check_count(len(culture), batch_size)
            if culture:
                check_id_range(min(culture), max(culture), len(self.cultures), "culture",
                               "not counted")  # fmt: skip
            present = {c for c in culture if c >= 0}
            return culture, present.pop() if len(present) == 1 else -1
        ids = torch.as_tensor(culture).reshape(-1)
        self._check_count(ids.numel(), batch_size)
        check_ids(ids, len(self.cultures), "culture", "not counted")
        one = -1
        if ids.device.type == "cpu" and self.backend == "fused":
            present = ids[ids >= 0].unique()
            one = int(present[0]) if present.numel() == 1 else -1
        return on_device(ids, device).long(), one

    @staticmethod
    def _check_count(given: int, batch_size: int) -> None:
        if given != batch_size:
            raise UsageError(f"got {given} culture ids for a batch of {batch_size} rows; "
                             "give one id per row (-1 = not counted)")  # fmt: skip

    def _culture_id(self, c) -> int:
        if isinstance(c, str):
            if c not in self.cultures:
                raise UsageError(f"unknown culture {c!r}; known: {', '.join(self.cultures)}")
            return self.cultures.index(c)
        if isinstance(c, float) or getattr(c, "is_floating_point", lambda: False)():
            raise UsageError(f"culture ids must be integers, got {c!r}; -1 = not counted")
        return int(c)

    def _set_ids(self, set_ids, batch_size: int) -> torch.Tensor:
        """int32 [B] ablation set ids (where given; moved per layer device by Batch.on); one
        value applies to every row."""
        ids = torch.as_tensor(set_ids).reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch_size)
        if ids.numel() != batch_size:
            raise UsageError(f"got {ids.numel()} ablation set ids for {batch_size} rows")
        check_ids(ids, len(self.masks), "set", "no ablation")
        return ids.to(torch.int32).contiguous()

    def _commit_counts(self, batch: Batch) -> None:
        # Committed when layer 0 runs, so a batch set but never run counts nothing. A staged
        # batch counts its tokens per slot; its items are counted by commit().
        batch.ran = True
        if batch.culture is None:
            return
        if batch.staged is not None:
            T, _ = self._staging.counts(batch.counts.device)
            T += batch.counts[0]
            return
        self.totals.count_block(batch.counts.device).add_(batch.counts)

    # -- results -------------------------------------------------------------------------
    def stats(self) -> Stats:
        """The statistics so far, on the CPU (the totals stay where they are; a staged batch
        not yet committed is not in them)."""
        if not self.recording:
            raise UsageError("this instrument does not record (no cultures were given)")
        return self.totals.stats()

    # -- attach / detach -----------------------------------------------------------------
    def detach(self) -> None:
        """Remove exactly what was added; the model is as before. Idempotent."""
        if self._impl is None:
            return
        self._impl.detach()
        self._impl = None
        for site in self.sites:
            for name in (_OWNER, "extra_repr"):
                site.mlp.__dict__.pop(name, None)

    def __enter__(self) -> Instrument:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def live_instrument(mlp: nn.Module) -> Instrument | None:
    """The attached Instrument of a decoder MLP, or None."""
    ref = mlp.__dict__.get(_OWNER)
    inst = ref() if ref is not None else None
    return inst if inst is not None and inst.attached else None


def refuse_live_instrument(mlps: list[nn.Module], conflict: str, backend: str | None = None,
                           alternative: str = "") -> None:  # fmt: skip
    """The one check that a model's decoder MLPs carry no live Instrument (of ``backend`` only,
    when given): UsageError naming the layer, the Instrument, ``conflict`` (why that cannot
    work) and what to do (detach, or ``alternative``)."""
    for layer, mlp in enumerate(mlps):
        live = live_instrument(mlp)
        if live is not None and backend in (None, live.backend):
            raise UsageError(f"decoder layer {layer}'s MLP already carries {live!r}, and "
                             f"{conflict}; detach it first (inst.detach() or leave its "
                             f"with-block){alternative}")  # fmt: skip


def record(model: nn.Module, cultures: list[str], **kwargs) -> Instrument:
    """Attach a recorder: per-culture statistics of every decoder MLP neuron."""
    return Instrument(model, cultures=cultures, **kwargs)


def ablate(model: nn.Module, masks, **kwargs) -> Instrument:
    """Attach an ablator: rows zero the neurons of their mask set (``set_ids=`` per row)."""
    return Instrument(model, masks=masks, **kwargs)


def steer(model: nn.Module, masks, alpha: float, **kwargs) -> Instrument:
    """Attach a steerer: rows multiply the neurons of their mask set by ``1 + alpha``
    (``set_ids=`` per row); ``alpha = -1`` is :func:`ablate`."""
    return Instrument(model, masks=masks, alpha=alpha, **kwargs)
