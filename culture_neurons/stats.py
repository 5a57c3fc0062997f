"""Per-culture neuron statistics (SPEC "Definitions").

Symbols: C cultures, L decoder layers of the language model, N MLP neurons per layer;
``a`` is the recorded activation (``activation="gate"``: ``act(gate_proj(x))``;
``"post"``: ``act(gate_proj(x)) * up_proj(x)``), ``w_t`` in {0, 1} the token weight.

    T[c]       = sum_t w_t                    tokens counted        int64   [C]
    K[c, l, n] = sum_t w_t * [a > 0]          firing count (exact)  int64   [C, L, N]
    S[c, l, n] = sum_t w_t * a                activation sum        float64 [C, L, N]
    Q[c, l, n] = sum_t w_t * a^2              squared sum           float64 [C, L, N]

Backends accumulate S and Q in fp32 within one forward and add them here in fp64, so
statistics of any length stay accurate and merge by plain addition (shards, GPUs, runs).
Nothing per token is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from culture_neurons.errors import DataError, StatsMismatchError, UsageError, first_line
from culture_neurons.kernels.args import ACTIVATIONS  # owned by the kernels: "gate" / "post"

SCOPES = ("all", "text", "image", "last")
STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
FORMAT_VERSION = 2  # 2: the fingerprint identifies the weights (weights_hash)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a model: its architecture and its weights. Stats merge, masks apply and
    cached predictions are reused only where these agree (see ``models.fingerprint``)."""

    family: str
    model_type: str
    num_layers: int  # L
    num_neurons: int  # N (intermediate size)
    hidden_size: int
    act_fn: str  # "silu" | "gelu_tanh"
    config_hash: str  # sha256 of the text config, volatile keys removed
    weights_hash: str = ""  # sha256 of sampled weights ("": not computed, a hand-built one)

    def differences(self, other: Fingerprint) -> list[str]:
        """Fields that differ, each as ``"name: mine vs theirs"``."""
        mine, theirs = asdict(self), asdict(other)
        out = []
        for k in mine:
            if mine[k] != theirs[k]:
                name = "weights" if k == "weights_hash" else k
                out.append(f"{name}: {mine[k]!r} vs {theirs[k]!r}")
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "this file") -> Fingerprint:
        """From a saved dict; one written before fingerprints covered the weights is refused
        (it could not tell a fine-tune from its base model)."""
        if isinstance(d, dict) and "config_hash" in d and "weights_hash" not in d:
            raise DataError(
                f"{where} was written by an older culture-neurons whose model fingerprint did "
                "not cover the weights (a fine-tune would pass for its base model); record the "
                "statistics again with this version"
            )
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass
class Stats:
    """Statistics of C cultures over the L x N neurons of one model (see module docstring).

    ``items[c]`` counts the items (rows) that contributed to culture c; ``options`` holds any
    further setting that must agree for a merge (e.g. ``{"items": "correct"}``).
    """

    cultures: list[str]
    fingerprint: Fingerprint
    activation: str
    scope: str
    T: torch.Tensor  # int64 [C]
    K: torch.Tensor  # int64 [C, L, N]
    S: torch.Tensor  # float64 [C, L, N]
    Q: torch.Tensor  # float64 [C, L, N]
    items: torch.Tensor  # int64 [C]
    options: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None  # (i, n): recorded on shard i of n of the items

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("scope", self.scope, SCOPES)
        C, L, N = len(self.cultures), self.fingerprint.num_layers, self.fingerprint.num_neurons
        if len(set(self.cultures)) != C:
            raise UsageError(f"culture names must be unique, got {self.cultures}")
        expected = {
            "T": ((C,), torch.int64), "items": ((C,), torch.int64),
            "K": ((C, L, N), torch.int64),
            "S": ((C, L, N), torch.float64), "Q": ((C, L, N), torch.float64),
        }  # fmt: skip
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise StatsMismatchError(
                    f"stats tensor {name} is {t.dtype} {list(t.shape)}, expected {dtype} "
                    f"{list(shape)} for {C} cultures x {L} layers x {N} neurons"
                )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def zeros(
        cls,
        cultures: list[str],
        fingerprint: Fingerprint,
        activation: str = "gate",
        scope: str = "all",
        options: dict | None = None,
        device: torch.device | str = "cpu",
    ) -> Stats:
        C, L, N = len(cultures), fingerprint.num_layers, fingerprint.num_neurons
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            cultures=list(cultures),
            fingerprint=fingerprint,
            activation=activation,
            scope=scope,
            T=torch.zeros(C, **i64),
            K=torch.zeros(C, L, N, **i64),
            S=torch.zeros(C, L, N, **f64),
            Q=torch.zeros(C, L, N, **f64),
            items=torch.zeros(C, **i64),
            options=dict(options or {}),
        )

    # -- shapes and derived quantities ------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, L, N)."""
        return tuple(self.K.shape)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        # T = 0 gives NaN on purpose: a culture with no tokens has no probability.
        return x.double() / self.T.double().view(-1, 1, 1)

    @property
    def P(self) -> torch.Tensor:
        """Activation probability K / T, float64 [C, L, N]."""
        return self._per_token(self.K)

    @property
    def M(self) -> torch.Tensor:
        """Mean activation S / T, float64 [C, L, N]."""
        return self._per_token(self.S)

    @property
    def var(self) -> torch.Tensor:
        """Population variance Q / T - M^2 (clamped at 0), float64 [C, L, N]."""
        return (self._per_token(self.Q) - self.M**2).clamp_min(0)

    def culture_index(self, name: str) -> int:
        try:
            return self.cultures.index(name)
        except ValueError:
            raise UsageError(
                f"unknown culture {name!r}; these stats have: {', '.join(self.cultures)}"
            ) from None

    # -- compatibility and merging ----------------------------------------------------------
    def mismatches(self, other: Stats) -> list[str]:
        """Every field that forbids merging ``other`` into these stats."""
        out = [f"model {d}" for d in self.fingerprint.differences(other.fingerprint)]
        if self.cultures != other.cultures:
            out.append(f"cultures: {self.cultures} vs {other.cultures}")
        for name in ("activation", "scope", "options"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}")
        return out

    def require_model(self, fingerprint: Fingerprint, what: str = "these stats") -> None:
        """Refuse stats recorded on another model (instead of misreading them)."""
        diff = self.fingerprint.differences(fingerprint)
        if diff:
            raise StatsMismatchError(
                f"{what} come from another model ({'; '.join(diff)}); "
                "record statistics with this model first"
            )

    def merge(self, *others: Stats) -> Stats:
        """Sum of these stats and ``others`` (all must agree on model, cultures, options).
        The sum is no longer one shard: use :func:`merge_shards` to check a full set."""
        out = self.clone()
        out.shard = None if others else self.shard
        for other in others:
            bad = self.mismatches(other)
            if bad:
                raise StatsMismatchError("cannot merge stats that differ in " + "; ".join(bad))
            for name in ("T", "K", "S", "Q", "items"):
                getattr(out, name).add_(getattr(other, name).to(getattr(out, name).device))
        return out

    __add__ = merge

    def content_hash(self) -> str:
        """sha256 of everything these stats hold (identical copies share it: ``merge`` refuses
        the same statistics twice by it)."""
        h = hashlib.sha256()
        meta = [self.cultures, asdict(self.fingerprint), self.activation, self.scope,
                self.options, self.shard]  # fmt: skip
        h.update(json.dumps(meta, sort_keys=True, default=list).encode())
        for name in ("T", "K", "S", "Q", "items"):
            h.update(getattr(self, name).detach().cpu().contiguous().numpy())
        return h.hexdigest()

    def clone(self) -> Stats:
        return self.to(self.K.device, copy=True)

    def to(self, device: torch.device | str, copy: bool = False) -> Stats:
        move = lambda t: t.to(device, copy=copy)
        return Stats(
            cultures=list(self.cultures),
            fingerprint=self.fingerprint,
            activation=self.activation,
            scope=self.scope,
            T=move(self.T), K=move(self.K), S=move(self.S), Q=move(self.Q),
            items=move(self.items),
            options=dict(self.options),
            shard=self.shard,
        )  # fmt: skip

    # -- files ------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``OUT/stats.safetensors`` and ``OUT/stats.json`` atomically; returns OUT."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).detach().cpu().contiguous() for n in ("T", "K", "S", "Q")}
        meta = {
            "format_version": FORMAT_VERSION,
            "cultures": self.cultures,
            "fingerprint": asdict(self.fingerprint),
            "activation": self.activation,
            "scope": self.scope,
            "options": self.options,
            "shard": list(self.shard) if self.shard else None,
            "items": self.items.tolist(),
            "tokens": self.T.tolist(),
            "versions": _versions(),
            **(extra or {}),
        }
        # Write to temporaries then rename, so an interrupted save never leaves half a file.
        tmp_st, tmp_js = out / (STATS_FILE + ".tmp"), out / (META_FILE + ".tmp")
        save_file(tensors, tmp_st, metadata={"format": "culture-neurons-stats"})
        tmp_js.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp_st, out / STATS_FILE)
        os.replace(tmp_js, out / META_FILE)
        return out


def stats_folder(path: str | os.PathLike) -> Path:
    """The folder of the statistics ``path`` names (an output dir, or either of its files).

    Raises:
        DataError: ``path`` does not exist, or is a file other than ours.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist; give the output dir of a run that recorded "
                        f"statistics (or its {META_FILE})")  # fmt: skip
    if p.is_dir():
        return p
    if p.name not in (STATS_FILE, META_FILE):
        raise DataError(f"{p} is not a statistics file; give an output dir or its {META_FILE}")
    return p.parent


def load_stats(path: str | os.PathLike, device: torch.device | str = "cpu") -> Stats:
    """Read stats saved by :meth:`Stats.save`. ``path`` is the output dir or either file.

    Raises:
        DataError: the path or a file is missing, unreadable, damaged or not ours (one line
            naming the file and what to do).
    """
    folder = stats_folder(path)
    st_path, js_path = folder / STATS_FILE, folder / META_FILE
    for f in (st_path, js_path):
        if not f.is_file():
            raise DataError(f"no statistics in {folder}: {f.name} is missing; run `record "
                            f"--out {folder}` first")  # fmt: skip
    try:
        meta = json.loads(js_path.read_text(encoding="utf-8"))
        tensors = load_file(st_path, device=str(device))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        bad = js_path if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) else st_path
        raise DataError(f"cannot read {bad} ({first_line(e)}): the file is damaged or "
                        "truncated; record the statistics again") from e  # fmt: skip
    try:
        return Stats(
            cultures=meta["cultures"],
            fingerprint=Fingerprint.from_dict(meta["fingerprint"], str(js_path)),
            activation=meta["activation"],
            scope=meta["scope"],
            T=tensors["T"], K=tensors["K"], S=tensors["S"], Q=tensors["Q"],
            items=torch.tensor(meta["items"], dtype=torch.int64, device=device),
            options=meta.get("options", {}),
            shard=tuple(meta["shard"]) if meta.get("shard") else None,
        )  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{folder} does not hold culture-neurons statistics ({e!r}); record "
                        "them again") from e  # fmt: skip


def merge_shards(parts: list[Stats]) -> Stats:
    """Sum statistics of separate jobs. Shards (``--shard i/n``) must be exactly the n shards
    of one split, each once: overlapping or missing ones are refused, naming which."""
    if not parts:
        raise UsageError("nothing to merge")
    shards = [p.shard for p in parts]
    if any(shards) and not all(shards):
        raise StatsMismatchError("cannot merge sharded with unsharded statistics")
    if all(shards):
        counts = {n for _, n in shards}
        if len(counts) != 1:
            raise StatsMismatchError(f"shards of different splits: n = {sorted(counts)}")
        n = counts.pop()
        seen = [i for i, _ in shards]
        dup = sorted({i for i in seen if seen.count(i) > 1})
        missing = sorted(set(range(n)) - set(seen))
        if dup or missing:
            what = []
            if dup:
                what.append(f"overlapping (given twice): {', '.join(f'{i}/{n}' for i in dup)}")
            if missing:
                what.append(f"missing: {', '.join(f'{i}/{n}' for i in missing)}")
            raise StatsMismatchError("shards do not cover the items exactly once; " + "; ".join(what))
    return parts[0].merge(*parts[1:])


def _versions() -> dict:
    import transformers

    from culture_neurons import __version__

    return {"culture_neurons": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}  # fmt: skip
