"""Selected neurons per set (usually per culture): what the selectors return and ablation reads.

Symbols: S sets (``names``), L layers, N neurons per layer (from the model ``fingerprint``).
A neuron (l, n) is stored by its flat index ``f = l * N + n``; the sets are CSR:

    indptr  int64 [S + 1]   set s is flat[indptr[s]:indptr[s + 1]]
    flat    int64 [nnz]     strictly increasing within each set (sorted, no repeats)

"Selected" always means "to be ablated": ``dense()`` is True there, ``keep_mask()`` is 0 there.

Files: ``save`` / ``load_masks`` write and read safetensors (``indptr``, ``flat``) with the rest
(names, fingerprint, method, options) as a JSON string in the safetensors metadata; a file
from another model is refused when a fingerprint is given. ``to_lape`` / ``from_lape`` speak the
format released by Tang et al. 2024 ("Language-Specific Neurons"): a ``torch.save``-d list over
sets of a list over layers of int64 tensors of neuron indices.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from culture_neurons.errors import DataError, StatsMismatchError, UsageError, first_line
from culture_neurons.stats import Fingerprint

FORMAT = "culture-neurons-masks"
FORMAT_VERSION = 2  # 2: the fingerprint identifies the weights


def set_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|A & B| / |A | B|`` of two sets of flat indices (unique each); NaN when both are
    empty (nothing to compare), never 0 or 1."""
    inter = int(torch.isin(a, b, assume_unique=True).sum())
    union = a.numel() + b.numel() - inter
    return inter / union if union else float("nan")


@dataclass
class Masks:
    """S sets of selected (layer, neuron) pairs of one model; see the module docstring."""

    names: list[str]
    fingerprint: Fingerprint
    indptr: torch.Tensor  # int64 [S + 1]
    flat: torch.Tensor  # int64 [nnz], l * N + n, strictly increasing within each set
    method: str = ""
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indptr = torch.as_tensor(self.indptr, dtype=torch.int64).cpu()
        self.flat = torch.as_tensor(self.flat, dtype=torch.int64).cpu()
        S, total = len(self.names), self.num_layers * self.num_neurons
        if len(set(self.names)) != S:
            raise DataError(f"mask set names must be unique, got {self.names}")
        ip, f = self.indptr, self.flat
        if ip.dim() != 1 or ip.numel() != S + 1 or ip[0] != 0 or ip[-1] != f.numel():
            raise DataError(
                f"masks indptr must be [S + 1] = [{S + 1}] from 0 to nnz = {f.numel()}, got "
                f"{ip.tolist() if ip.numel() <= 8 else list(ip.shape)}"
            )
        if bool((ip[1:] < ip[:-1]).any()):
            raise DataError("masks indptr must be non-decreasing")
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= total):
            raise DataError(
                f"masks hold neuron indices outside [0, L * N) = [0, {total}) for "
                f"{self.num_layers} layers x {self.num_neurons} neurons"
            )
        # Strictly increasing within a set: a step may only go down where a new set starts.
        sid = self._set_ids()
        ok = (f[1:] > f[:-1]) | (sid[1:] != sid[:-1])
        if not bool(ok.all()):
            raise DataError("masks flat indices must be sorted and unique within each set")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_sets(
        cls,
        names: list[str],
        sets: list[torch.Tensor],
        fingerprint: Fingerprint,
        method: str = "",
        options: dict | None = None,
    ) -> Masks:
        """Build from one int64 tensor of flat indices ``l * N + n`` per set (any order)."""
        if len(sets) != len(names):
            raise UsageError(f"{len(names)} names but {len(sets)} sets")
        parts = [
            torch.as_tensor(s, dtype=torch.int64).reshape(-1).cpu().sort().values for s in sets
        ]
        for name, p in zip(names, parts, strict=True):
            if p.numel() > 1 and bool((p[1:] == p[:-1]).any()):
                raise DataError(f"set {name!r} lists a neuron twice")
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return cls(list(names), fingerprint, indptr, flat, method, dict(options or {}))

    # -- shapes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    @property
    def num_neurons(self) -> int:
        return self.fingerprint.num_neurons

    def __len__(self) -> int:
        """Number of sets S (not of neurons: see ``sizes()``)."""
        return len(self.names)

    def sizes(self) -> torch.Tensor:
        """Neurons per set, int64 [S]."""
        return self.indptr[1:] - self.indptr[:-1]

    def set_index(self, s: int | str) -> int:
        """Index of set ``s`` given by position or name."""
        if isinstance(s, str):
            if s not in self.names:
                raise UsageError(f"unknown set {s!r}; these masks have: {', '.join(self.names)}")
            return self.names.index(s)
        if not -len(self) <= s < len(self):
            raise UsageError(f"set index {s} out of range for {len(self)} sets")
        return s % len(self)

    def flat_of(self, s: int | str) -> torch.Tensor:
        """Flat indices ``l * N + n`` of set ``s``, int64 [n], increasing."""
        i = self.set_index(s)
        return self.flat[self.indptr[i] : self.indptr[i + 1]]

    def pairs(self, s: int | str) -> torch.Tensor:
        """(layer, neuron) pairs of set ``s``, int64 [n, 2], in (layer, neuron) order."""
        f = self.flat_of(s)
        return torch.stack([f // self.num_neurons, f % self.num_neurons], dim=1)

    def _set_ids(self) -> torch.Tensor:
        """Set index of every entry of ``flat``, int64 [nnz]."""
        # numpy: torch.repeat_interleave costs ~7 ms even on tiny inputs with 2 intra-op threads
        # on the busy bench CPU.
        return torch.from_numpy(
            np.repeat(np.arange(len(self), dtype=np.int64), self.sizes().numpy())
        )

    def layer_counts(self) -> torch.Tensor:
        """Selected neurons per set and layer, int64 [S, L]."""
        S, L = len(self), self.num_layers
        key = self._set_ids() * L + self.flat // self.num_neurons
        return torch.bincount(key, minlength=S * L).view(S, L)

    def dense(self) -> torch.Tensor:
        """bool [S, L, N]; True = selected (to be ablated)."""
        out = torch.zeros(len(self), self.num_layers * self.num_neurons, dtype=torch.bool)
        out[self._set_ids(), self.flat] = True
        return out.view(len(self), self.num_layers, self.num_neurons)

    def keep_mask(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.uint8,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Keep mask for ablation, ``dtype`` ``[L, S, N]`` contiguous (``[S, N]`` with ``layer``).

        ``keep[l, s, n]`` is 1 where neuron (l, n) is kept for rows of set s and 0 where set s
        ablates it; layer-major so that layer l's kernel reads one contiguous [S, N] block.
        The one place a keep mask is built from the sets (O(selected) writes).
        """
        L, N = self.num_layers, self.num_neurons
        layer_of, neuron = self.flat // N, self.flat % N
        set_of = self._set_ids()
        if layer is None:
            keep = torch.ones(L, len(self), N, dtype=dtype, device=device)
            keep[layer_of.to(device), set_of.to(device), neuron.to(device)] = 0
            return keep
        here = layer_of == layer
        keep = torch.ones(len(self), N, dtype=dtype, device=device)
        keep[set_of[here].to(device), neuron[here].to(device)] = 0
        return keep

    # -- comparison ---------------------------------------------------------------------------
    def jaccard(self, other: Masks | None = None) -> torch.Tensor:
        """Overlap |A & B| / |A | B| of every set here with every set of ``other``, float64 [S, S'].

        ``other=None`` compares these sets with each other (cultures of one method). Two empty
        sets give NaN (nothing to compare), never 0 or 1.
        """
        other = self if other is None else other
        self.require_model(other.fingerprint, "the other masks")
        out = torch.empty(len(self), len(other), dtype=torch.float64)
        for i in range(len(self)):
            a = self.flat_of(i)
            for j in range(len(other)):
                out[i, j] = set_jaccard(a, other.flat_of(j))
        return out

    def require_model(self, fingerprint: Fingerprint, what: str = "these masks") -> None:
        """Refuse use with another model: StatsMismatchError naming the differing fields."""
        diff = self.fingerprint.differences(fingerprint)
        if diff:
            raise StatsMismatchError(
                f"{what} belong to another model ({'; '.join(diff)}); select neurons with "
                "statistics of this model"
            )

    def content_hash(self) -> str:
        """sha256 of the sets themselves (names, model, indices; not method or options): what
        cached predictions under these masks are keyed on, never their sizes alone."""
        h = hashlib.sha256()
        h.update(json.dumps([self.names, asdict(self.fingerprint)], sort_keys=True).encode())
        h.update(self.indptr.contiguous().numpy())
        h.update(self.flat.contiguous().numpy())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks):
            return NotImplemented
        return (
            self.names == other.names
            and self.fingerprint == other.fingerprint
            and self.method == other.method
            and self.options == other.options
            and torch.equal(self.indptr, other.indptr)
            and torch.equal(self.flat, other.flat)
        )

    def __repr__(self) -> str:
        sizes = self.sizes()
        span = f"{int(sizes.min())}..{int(sizes.max())}" if len(self) else "-"
        return (
            f"Masks(method={self.method!r}, {len(self)} sets over {self.num_layers} layers x "
            f"{self.num_neurons} neurons, sizes {span} (total {self.flat.numel()}), "
            f"options={self.options})"
        )

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (e.g. ``OUT/masks/<method>.safetensors``) atomically; returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "names": self.names,
            "fingerprint": asdict(self.fingerprint),
            "method": self.method,
            "options": self.options,
        }
        try:
            meta_json = json.dumps(meta, ensure_ascii=False)
        except TypeError as e:
            raise UsageError(f"mask options must be JSON-serialisable, got {self.options}") from e
        tensors = {"indptr": self.indptr.contiguous(), "flat": self.flat.contiguous()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": FORMAT, "meta": meta_json})
        os.replace(tmp, path)
        return path

    def to_lape(self, path: str | os.PathLike) -> Path:
        """Write LAPE's released format: ``torch.save`` of a list over sets of a list over
        layers of int64 tensors of neuron indices (increasing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        L, N = self.num_layers, self.num_neurons
        nested = []
        for s in range(len(self)):
            f = self.flat_of(s)
            counts = torch.bincount(f // N, minlength=L).tolist()
            nested.append([t.clone() for t in torch.split(f % N, counts)])
        torch.save(nested, path)
        return path

    @classmethod
    def from_lape(
        cls,
        path: str | os.PathLike,
        fingerprint: Fingerprint,
        names: list[str],
        method: str = "lape",
    ) -> Masks:
        """Read LAPE's released format (see :meth:`to_lape`) for the model ``fingerprint``.

        Loaded with ``torch.load(weights_only=True)``: nothing but tensors and lists is ever
        unpickled. ``names`` names the sets in file order (LAPE: languages in its order).

        Raises:
            DataError: the file is not a list (sets) of lists (one per layer) of 1-D integer
                tensors of neuron indices in [0, N), or the counts disagree with the model.
        """
        path = Path(path)
        L, N = fingerprint.num_layers, fingerprint.num_neurons
        try:
            nested = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"no LAPE neuron file at {path}") from None
        except Exception as e:  # the unpickler refuses anything but tensors and containers
            raise DataError(f"{path} is not a LAPE neuron file readable safely ({e})") from e
        where = f"LAPE neuron file {path}"
        if not isinstance(nested, (list, tuple)) or len(nested) != len(names):
            got = f"a list of {len(nested)}" if isinstance(nested, (list, tuple)) else type(nested)
            raise DataError(f"{where}: expected a list of {len(names)} sets ({names}), got {got}")
        sets = []
        for name, layers in zip(names, nested, strict=True):
            if not isinstance(layers, (list, tuple)) or len(layers) != L:
                raise DataError(
                    f"{where}: set {name!r} must be a list of {L} per-layer tensors (the model "
                    f"has {L} layers), got {type(layers).__name__} of "
                    f"{len(layers) if isinstance(layers, (list, tuple)) else '?'}"
                )
            per_layer = []
            for layer, t in enumerate(layers):
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
                    raise DataError(
                        f"{where}: set {name!r} layer {layer} must be a 1-D integer tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
                    )
                t = t.long()
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= N):
                    raise DataError(
                        f"{where}: set {name!r} layer {layer} has neuron indices outside [0, {N})"
                    )
                per_layer.append(t + layer * N)
            sets.append(torch.cat(per_layer) if per_layer else torch.zeros(0, dtype=torch.int64))
        options = {"source": str(path), "format": "lape"}
        return cls.from_sets(list(names), sets, fingerprint, method, options)


def load_masks(path: str | os.PathLike, fingerprint: Fingerprint | None = None) -> Masks:
    """Read masks written by :meth:`Masks.save`.

    Args:
        path: the ``.safetensors`` file.
        fingerprint: the model the masks will be used with; masks of another model are refused.

    Raises:
        DataError: missing or malformed file.
        StatsMismatchError: ``fingerprint`` given and different (names the differing fields).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no masks at {path}; run `select` first")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise DataError(
                f"{path} is not a culture-neurons masks file (format={header.get('format')!r})"
            )
        meta = json.loads(header["meta"])
        masks = Masks(
            names=list(meta["names"]),
            fingerprint=Fingerprint.from_dict(meta["fingerprint"], f"masks {path}"),
            indptr=tensors["indptr"],
            flat=tensors["flat"],
            method=meta.get("method", ""),
            options=meta.get("options", {}),
        )
    except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
        raise DataError(f"cannot read masks {path} ({first_line(e)}): damaged, truncated or "
                        "not ours; run `select` again") from e  # fmt: skip
    if fingerprint is not None:
        masks.require_model(fingerprint, f"masks {path}")
    return masks
