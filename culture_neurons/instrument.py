"""Attach to a model's decoder MLPs to record per-culture statistics and/or ablate neurons.

One :class:`Instrument` serves both jobs because the fused kernel does both in one pass:
every flattened token row carries a culture id (``-1`` = not counted) and an ablation-set id
(``-1`` = no ablation). A batch may mix cultures and sets freely, so a whole
source-by-target ablation matrix runs in few passes.

    with culture_neurons.record(model, cultures=["ja", "mx"]) as rec:
        for batch, culture in loader:                 # culture: one id (or name) per row
            rec(culture, **batch)                     # = rec.set_batch(...); model(**batch)
    stats = rec.stats()

Backends (``rec.backend``): ``hooks`` (plain PyTorch forward hooks, the reference) and
``fused`` (the MLP forward replaced on the instance by one fused op; see backends/fused.py).
Patching is per instance, never per class; detaching restores the model exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from . import adapters
from .errors import StatsMismatchError, UsageError
from .stats import ACTIVATIONS, Stats, check_choice
from .tokens import row_cultures, token_weights

log = logging.getLogger(__name__)
BACKENDS = ("auto", "hooks", "fused")


@dataclass
class Batch:
    """Per-row state of the forward(s) about to run."""

    batch_size: int  # B
    rows: int  # B*T of the prompt: a recorded forward must have exactly these token rows
    culture: torch.Tensor | None  # int32 [B*T], -1 = not counted; None = no recording
    ablate: torch.Tensor | None  # int32 [B], -1 = no ablation; None = no ablation
    serial: int
    counts: tuple[torch.Tensor, torch.Tensor] | None  # (tokens, items) per culture, int64 [C]
    _cache: dict = field(default_factory=dict)

    def on(self, device: torch.device, tokens_per_row: int):
        """(culture [B*T], set ids [B*T]) on ``device``; moved once per device and length
        (layers may sit on several devices; generate() runs one token per row at a time)."""
        key = (device, tokens_per_row)
        if key not in self._cache:
            culture = None if self.culture is None else self.culture.to(device)
            ablate = None
            if self.ablate is not None:
                ablate = self.ablate.repeat_interleave(tokens_per_row).to(device)
            self._cache[key] = (culture, ablate)
        return self._cache[key]


class Site:
    """One decoder MLP: its layer, its accumulators and its slice of the ablation masks."""

    def __init__(self, inst: Instrument, layer: int, mlp: nn.Module):
        self.inst, self.layer, self.mlp = inst, layer, mlp
        self.device = mlp.gate_proj.weight.device
        self.last_serial = -1
        self.current = None  # (culture, set ids) of the forward in progress
        self.K = self.S = self.Q = None  # int64 / float64 / float64 [C, N], if recording
        self.K32 = self.S32 = self.Q32 = None  # a backend's per-forward working sums, if any
        self.keep = None  # [S+1, N] keep-mask of this layer (last row all ones: set -1)

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
        self.current = batch.on(x.device, rows // batch.batch_size)
        return self.current


class Instrument:
    """Records statistics (``cultures`` given) and/or ablates (``masks`` given); see module doc.

    Args:
        model: a HF model of a supported family (see :mod:`culture_neurons.adapters`).
        cultures: C culture names, the rows' culture ids index this list.
        masks: a :class:`culture_neurons.masks.Masks` of S sets; the rows' ablation ids index it.
        activation: ``gate`` (``act(gate_proj(x))``) or ``post`` (``act(...) * up_proj(x)``).
        scope: ``all`` / ``text`` / ``image`` / ``last``: which tokens count.
        backend: ``auto`` (fused), ``fused`` or ``hooks``.
        options: further settings stored in the stats (must agree for a merge).
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
        self.options = dict(options or {})
        self._batch: Batch | None = None
        self._serial = 0
        self.sites = [Site(self, i, mlp) for i, mlp in enumerate(adapters.decoder_mlps(model))]
        if masks is not None:
            masks_fp = getattr(masks, "fingerprint", None)
            if masks_fp is not None and masks_fp.differences(self.fingerprint):
                raise StatsMismatchError(
                    "these masks were selected on another model ("
                    + "; ".join(masks_fp.differences(self.fingerprint))
                    + "); select neurons from this model's statistics"
                )
            keep = masks.keep_mask(device="cpu", dtype=torch.uint8)  # [L, S, N]
            ones = torch.ones(keep.shape[0], 1, keep.shape[2], dtype=keep.dtype)
            keep = torch.cat([keep, ones], dim=1)  # set id -1 -> the all-ones last row
            for site in self.sites:
                site.keep = keep[site.layer].to(site.device)
        self.reset_stats()
        self.backend = self._choose_backend(backend)
        self._impl = _backend_module(self.backend).attach(self)
        for site in self.sites:  # so that print(model) shows what is instrumented
            site.mlp.extra_repr = lambda b=self.backend: f"[culture_neurons: {b} backend]"
        log.info("instrumented %d decoder MLPs with the %s backend", len(self.sites), self.backend)

    # -- state ---------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self.cultures is not None

    def reset_stats(self) -> None:
        """Zero the accumulators (the attached model is unchanged)."""
        if not self.recording:
            return
        C, N = len(self.cultures), self.fingerprint.num_neurons
        for site in self.sites:
            site.K = torch.zeros(C, N, dtype=torch.int64, device=site.device)
            site.S = torch.zeros(C, N, dtype=torch.float64, device=site.device)
            site.Q = torch.zeros(C, N, dtype=torch.float64, device=site.device)
        self._T = torch.zeros(C, dtype=torch.int64)
        self._items = torch.zeros(C, dtype=torch.int64)

    def start_from(self, stats: Stats) -> None:
        """Continue accumulating from ``stats`` (a checkpoint of this same recording): the
        totals then equal, bit for bit, those of a run that was never interrupted."""
        probe = Stats.zeros(self.cultures, self.fingerprint, self.activation, self.scope,
                            self.options)  # fmt: skip
        bad = probe.mismatches(stats)
        if bad:
            raise StatsMismatchError("cannot continue from stats that differ in " + "; ".join(bad))
        for site in self.sites:
            l = site.layer
            site.K.copy_(stats.K[:, l]), site.S.copy_(stats.S[:, l]), site.Q.copy_(stats.Q[:, l])
        self._T.copy_(stats.T)
        self._items.copy_(stats.items)

    def _choose_backend(self, backend: str) -> str:
        return "fused" if backend == "auto" else backend

    # -- per batch -----------------------------------------------------------------------
    def set_batch(
        self,
        culture=None,
        *,
        ablate=None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_unused,
    ) -> None:
        """Describe the next forward: one culture id (or name) per row, -1 = not counted;
        ``ablate``: one mask-set id per row, -1 = none. Token weights come from
        ``attention_mask`` (padding) and ``input_ids`` (image tokens) under the scope."""
        if input_ids is None and attention_mask is None:
            raise UsageError("set_batch needs input_ids or attention_mask to know the rows")
        shape = (input_ids if input_ids is not None else attention_mask).shape
        weights = token_weights(attention_mask, input_ids, self.scope, self.image_token_ids)
        rows = counts = None
        if culture is not None:
            if not self.recording:
                raise UsageError("this instrument was built without cultures; it cannot record")
            ids = self._culture_ids(culture, shape[0])
            rows = row_cultures(ids, weights)
            C = len(self.cultures)
            counted = rows[rows >= 0].long().cpu()
            counts = (torch.bincount(counted, minlength=C), torch.bincount(ids[ids >= 0].long(), minlength=C))
        set_ids = None
        if ablate is not None:
            if self.masks is None:
                raise UsageError("this instrument was built without masks; it cannot ablate")
            set_ids = self._set_ids(ablate, shape[0])
        self._serial += 1
        self._batch = Batch(shape[0], shape[0] * shape[1], rows, set_ids, self._serial, counts)

    def clear_batch(self) -> None:
        """Forget the rows set by set_batch (the next forward must set its own)."""
        self._batch = None

    def __call__(self, culture=None, *, ablate=None, **inputs):
        """``set_batch(culture, ablate=..., **inputs)`` then ``model(**inputs)``."""
        self.set_batch(culture, ablate=ablate, **inputs)
        try:
            return self.model(**inputs)
        finally:
            self.clear_batch()

    def generate(self, *, ablate=None, **kwargs):
        """``model.generate(**kwargs)`` with rows ablated by ``ablate`` throughout (ablation
        only: statistics are recorded on prompt forwards)."""
        self.set_batch(None, ablate=ablate, **kwargs)
        try:
            return self.model.generate(**kwargs)
        finally:
            self.clear_batch()

    def _culture_ids(self, culture, batch_size: int) -> torch.Tensor:
        """int32 [B] culture ids from names or ids; one value applies to every row."""
        if isinstance(culture, (str, int)):
            culture = [culture] * batch_size
        ids = [self._culture_id(c) for c in culture] if isinstance(culture, list) else culture
        ids = torch.as_tensor(ids, dtype=torch.int32).view(-1).cpu()
        if ids.numel() and (ids.max() >= len(self.cultures) or ids.min() < -1):
            raise UsageError(f"culture ids must be in [-1, {len(self.cultures) - 1}], got {ids}")
        return ids

    def _culture_id(self, c) -> int:
        if isinstance(c, str):
            if c not in self.cultures:
                raise UsageError(f"unknown culture {c!r}; known: {', '.join(self.cultures)}")
            return self.cultures.index(c)
        return int(c)

    def _set_ids(self, ablate, batch_size: int) -> torch.Tensor:
        """int32 [B] ablation set ids; one value applies to every row."""
        ids = torch.as_tensor(ablate, dtype=torch.int32).view(-1).cpu()
        if ids.numel() == 1:
            ids = ids.expand(batch_size)
        if ids.numel() != batch_size:
            raise UsageError(f"got {ids.numel()} ablation ids for {batch_size} rows")
        n_sets = len(self.masks)
        if ids.max() >= n_sets or ids.min() < -1:
            raise UsageError(f"ablation ids must be in [-1, {n_sets - 1}], got {ids.tolist()}")
        return ids.contiguous()

    def _commit_counts(self, batch: Batch) -> None:
        # Committed when layer 0 runs, so a batch set but never run counts nothing.
        if batch.counts is not None:
            self._T += batch.counts[0]
            self._items += batch.counts[1]

    # -- results -------------------------------------------------------------------------
    def stats(self) -> Stats:
        """The statistics so far, on the CPU (accumulators stay where they are)."""
        if not self.recording:
            raise UsageError("this instrument does not record (no cultures were given)")
        if self._impl is not None:  # after detach the totals are already complete
            self._impl.flush()
        stack = lambda name: torch.stack([getattr(s, name).cpu() for s in self.sites], dim=1)
        return Stats(
            cultures=list(self.cultures),
            fingerprint=self.fingerprint,
            activation=self.activation,
            scope=self.scope,
            T=self._T.clone(), K=stack("K"), S=stack("S"), Q=stack("Q"),
            items=self._items.clone(),
            options=dict(self.options),
        )  # fmt: skip

    # -- attach / detach -----------------------------------------------------------------
    def detach(self) -> None:
        """Remove exactly what was added; the model is as before."""
        if self._impl is not None:
            self._impl.detach()
            self._impl = None
            for site in self.sites:
                del site.mlp.extra_repr

    def __enter__(self) -> Instrument:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _backend_module(name: str):
    import importlib

    return importlib.import_module(f".backends.{name}", __package__)


def record(model: nn.Module, cultures: list[str], **kwargs) -> Instrument:
    """Attach a recorder: per-culture statistics of every decoder MLP neuron."""
    return Instrument(model, cultures=cultures, **kwargs)


def ablate(model: nn.Module, masks, **kwargs) -> Instrument:
    """Attach an ablator: rows zero the neurons of their mask set (``ablate=`` ids)."""
    return Instrument(model, masks=masks, **kwargs)
