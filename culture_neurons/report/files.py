"""What a finished run left in ``OUT`` (``run.json``, ``stats.json``, ``eval/*.json``), read
back for the reports: they need only files, never the model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from culture_neurons.errors import DataError

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
LEGACY_RND = "rnd"  # eval/rnd.json of runs before every method had its own RND control


@dataclass
class RunFiles:
    """What a run left in ``out`` (see the module docstring); only ``evals`` is required."""

    out: Path
    meta: dict  # run.json: config, cultures, fingerprint, data ({} if absent)
    stats: dict  # stats.json: fingerprint, items, tokens, ... ({} if absent)
    evals: dict[str, dict]  # method -> eval/<method>.json, in the run's order
    full: dict = field(default_factory=dict)  # eval/full.json: items, predictions, tokens
    cultures: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.cultures = list(next(iter(self.evals.values()))["cultures"])
        for name, ev in self.evals.items():
            if list(ev["cultures"]) != self.cultures:
                raise DataError(
                    f"eval/{name}.json is for cultures {ev['cultures']}, the other results for "
                    f"{self.cultures}; evaluate all methods of one run into one output dir"
                )

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def labels(self) -> bool:
        """True only if every result was computed with labels (any hidden: no accuracy)."""
        return all(ev.get("labels_available") and ev.get("delta") is not None
                   for ev in self.evals.values())  # fmt: skip

    @property
    def methods(self) -> list[str]:
        """The selectors evaluated (each JSON carries its own RND control)."""
        return list(self.evals)

    @property
    def first(self) -> dict:
        """One method's results: what every method shares (cultures, items, full model)."""
        return next(iter(self.evals.values()))

    @property
    def fingerprint(self) -> dict:
        return self.stats.get("fingerprint") or self.meta.get("fingerprint") or {}


def load_run(out_dir: str | os.PathLike) -> RunFiles:
    """Read the JSON files of a run in ``out_dir``.

    Raises:
        DataError: no ``eval/<method>.json`` (the run has not been evaluated), or a file
            that is not JSON, or results for different cultures.
    """
    out = Path(out_dir)
    eval_dir = out / "eval"
    found = sorted(p.stem for p in eval_dir.glob("*.json") if p.stem not in ("full", LEGACY_RND))
    if not found:
        raise DataError(f"no evaluation results in {eval_dir}; run `evaluate` before the report")
    meta, stats = read_json(out / "run.json", {}), read_json(out / "stats.json", {})
    # The run's method order first (as configured), anything else after it.
    configured = [m for m in meta.get("config", {}).get("methods", []) if m in found]
    order = configured + [m for m in found if m not in configured]
    evals = {m: read_json(eval_dir / f"{m}.json") for m in order}
    return RunFiles(out, meta, stats, evals, read_json(eval_dir / "full.json", {}))


def read_json(path: Path, default: dict | None = None) -> dict:
    """A JSON file (``NaN`` literals allowed: summaries of a 1-culture run hold them)."""
    if not path.is_file():
        if default is not None:
            return default
        raise DataError(f"missing {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun the step that writes it") from e


def num(x) -> float:
    """A JSON number as float; ``None`` (a culture without items, or undefined) as NaN."""
    return float("nan") if x is None else float(x)


def matrix(rows) -> np.ndarray:
    """A JSON [S][C] matrix with ``null`` cells as a float64 array with NaN."""
    return np.array([[num(v) for v in row] for row in rows], dtype=np.float64).reshape(
        len(rows), -1
    )


def write_text(path: Path, text: str) -> Path:
    """Written to a temporary file and renamed, so a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
