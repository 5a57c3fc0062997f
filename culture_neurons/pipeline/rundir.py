"""The output dir of a run and what keeps its steps in agreement.

``OUT/run.json`` holds the run's settings (``config``, every :class:`RunConfig` field), how the
command line loaded model and data (``inputs``), the model fingerprint, a hash of the items
(``data_hash``) and every setting changed after the run began (``changes``). Each step reads it:

- a setting given to a later step that differs from run.json is refused (one line naming the
  setting, both values and what to pass), unless its step may change it (``select`` with
  ``--overwrite`` for selection settings, any evaluation for evaluation settings, anything
  for execution settings): then the change is recorded in run.json;
- masks carry the selection settings they were made with (``options["selection"]``) and
  eval JSONs the content hash of the masks they used (``masks_hash``), checked by
  ``evaluate`` and ``report`` against the run;
- cached predictions and checkpoints under ``OUT/progress`` carry a key (:func:`digest` of the
  model fingerprint and dtype, the items and the masks' content) and are used only under the
  same key: anything else is recomputed, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from culture_neurons.errors import DataError, StatsMismatchError, UsageError, first_line
from culture_neurons.pipeline.config import RunConfig, flag, step_of

RUN_FILE = "run.json"
# Everything a run writes into OUT, in the order it is written.
RESULTS = ("run.json", "progress", "stats.safetensors", "stats.json", "halves", "masks",
           "eval", "figures", "report.md")  # fmt: skip
# What each step's results make stale when they are replaced.
DERIVED = {
    "stats": ("masks", "eval", "figures", "report.md"),
    "masks": ("masks", "eval", "figures", "report.md"),
}
# Which steps' settings a step may change (recorded in run.json); others are refused.
MAY_CHANGE = {"run": ("evaluate", "exec"), "record": ("evaluate", "exec"),
              "select": ("select", "exec"), "evaluate": ("evaluate", "exec"),
              "report": ("exec",), "merge": ("select", "evaluate", "exec")}  # fmt: skip


# -- files ----------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """Atomic: a temporary file renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str = "") -> dict | list | None:
    """A JSON file of ours, None when absent.

    Raises:
        DataError: unreadable or not JSON (one line naming the file and what to do).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({first_line(e)}): the file is damaged; "
                        f"{what or 'run the step that writes it again'}") from e  # fmt: skip


def read_run(out: Path) -> dict | None:
    """``OUT/run.json``, None when the dir holds no run settings."""
    meta = read_json(Path(out) / RUN_FILE, "start the run again with --overwrite")
    if meta is not None and not isinstance(meta.get("config"), dict):
        raise DataError(f"{Path(out) / RUN_FILE} holds no run settings; start the run again "
                        "with --overwrite")  # fmt: skip
    return meta


def present(out: Path) -> list[str]:
    """The results of a run found in ``out`` (names from :data:`RESULTS`)."""
    return [name for name in RESULTS if (Path(out) / name).exists()]


def remove(out: Path, names) -> None:
    """Delete these results of ``out`` (files or folders)."""
    for name in names:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def digest(*parts) -> str:
    """sha256 of JSON-serialisable ``parts``: the key of a cached result."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_hash(data) -> str:
    """What identifies the items of a run: every item's fields (id, culture, text, options,
    label; not the image bytes), as their dataclass repr spells them."""
    return digest([repr(it) for it in data])[:16]


# -- states ---------------------------------------------------------------------------------
def check_writable_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or of a run)")


def check_start(out: Path, resume: bool, overwrite: bool) -> None:
    """``run`` / ``record`` may start in ``out``: empty, or --resume / --overwrite given."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite do not combine: --resume continues the run "
                         "in --out, --overwrite replaces it; pass one of them")  # fmt: skip
    check_writable_out(out)
    found = present(out)
    if found and not (resume or overwrite):
        raise UsageError(f"{out} already holds a run ({', '.join(found)}); pass --resume to "
                         "continue it or --overwrite to replace it")  # fmt: skip


def open_run(out: Path, resume: bool, overwrite: bool, *, from_stats: bool = False) -> dict | None:
    """The run a ``run`` / ``record`` continues in ``out`` (refused as :func:`check_start` says):
    its run.json when resuming, else None. ``from_stats``: statistics saved without a run.json
    (from Python, merged) count as a run of the settings stats.json records."""
    check_start(out, resume, overwrite)
    if not resume or not present(out):
        return None
    meta = read_run(out)
    if meta is None and from_stats:
        meta = {"config": settings_from_stats(read_json(out / "stats.json") or {})}
    return meta


def check_continues(out: Path, old: dict, settings: dict, command: str, *,
                    given: dict | None = None, steps: dict | None = None,
                    **same) -> None:  # fmt: skip
    """Refuse continuing the run of ``old`` (its run.json) with other items, another model
    (``same``: :func:`check_same_run`'s) or settings ``command`` may not change."""
    check_same_run(out, old, **same)
    refuse(out, conflicts(old["config"], settings, command, steps), given or {}, steps)


def begin(out: Path, meta: dict, *, resume: bool, overwrite: bool, command: str,
          fingerprint=None) -> None:  # fmt: skip
    """Check ``out`` against the run of ``meta`` (run.json's fields; refusing before anything
    is written: :func:`open_run`, :func:`check_continues`), then write its run.json: settings
    changed since the run began are recorded in its ``changes``, ``command`` naming the step."""
    old = open_run(out, resume, overwrite, from_stats=True)
    if overwrite:
        remove(out, RESULTS)
    elif old is not None:
        check_continues(out, old, meta["config"], "run", cultures=meta["cultures"],
                        data_hash=meta["data_hash"], fingerprint=fingerprint)  # fmt: skip
        meta = {**meta, "changes": old.get("changes", []) + changes(old["config"],
                                                                    meta["config"], command),
                "inputs": {**old.get("inputs", {}), **meta["inputs"]}}  # fmt: skip
    try:
        (out / "progress").mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, meta)
    except OSError as e:
        raise UsageError(f"cannot write to output dir {out} ({e.strerror}); choose a writable "
                         "--out") from e  # fmt: skip


def check_same_run(out: Path, old: dict, *, cultures: list[str] | None = None,
                   data_hash: str | None = None, fingerprint=None) -> None:  # fmt: skip
    """Refuse continuing the run of ``old`` (its run.json) with another model, other cultures
    or other items (what is not given is not checked: the model before it is loaded)."""
    from culture_neurons.stats import Fingerprint

    if fingerprint is not None and "fingerprint" in old:
        theirs = Fingerprint.from_dict(old["fingerprint"], str(out / RUN_FILE))
        diff = theirs.differences(fingerprint)
        if diff:
            raise StatsMismatchError(f"{out} holds the results of another model ({'; '.join(diff)}"
                                     f", run's vs given); use a new --out for this model")  # fmt: skip
    if cultures is not None and "cultures" in old and old["cultures"] != cultures:
        raise UsageError(f"the data gives cultures {show(cultures)}, this run has "
                         f"{show(old['cultures'])} ({out / RUN_FILE}); pass the run's --data and "
                         "--cultures, or start a new run")  # fmt: skip
    if data_hash is not None and old.get("data_hash") not in (None, data_hash):
        raise UsageError(f"the data given holds other items than this run's ({old.get('data')}, "
                         f"see {out / RUN_FILE}); pass the run's --data, or start a new "
                         "run")  # fmt: skip


def require(out: Path, names, then: str) -> None:
    """Refuse a step whose inputs are not in ``out`` (one line naming the first missing)."""
    if not out.exists():
        raise UsageError(f"--out {out} does not exist; {then}")
    for name in names:
        if not (out / name).exists():
            raise UsageError(f"{out} holds no {name}; {then}")


# -- settings -------------------------------------------------------------------------------
def show(value) -> str:
    """A setting as the command line spells it."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def conflicts(old: dict, new: dict, command: str,
              steps: dict[str, str] | None = None) -> list[tuple[str, object, object]]:  # fmt: skip
    """``(name, old, new)`` of every setting in both that differs and that ``command`` may not
    change (:data:`MAY_CHANGE`). ``steps``: the step of each name (default: RunConfig's;
    anything else counts as ``identify``)."""
    allowed = MAY_CHANGE[command]
    out = []
    for name, value in new.items():
        if name in old and _norm(old[name]) != _norm(value):
            if _step(name, steps) not in allowed:
                out.append((name, old[name], value))
    return out


def _step(name: str, steps: dict[str, str] | None) -> str:
    return (steps or {}).get(name) or step_of(name) or "identify"


def refuse(out: Path, found: list[tuple[str, object, object]], given: dict[str, str],
           steps: dict[str, str] | None = None) -> None:  # fmt: skip
    """One line naming the first differing setting, both values and what to pass (``given``:
    how each was given, e.g. ``{"ratio": "ratio in run.toml"}``; default its flag)."""
    if not found:
        return
    name, old, new = found[0]
    where = given.get(name, flag(name))
    if _step(name, steps) == "select":
        todo = (f"to select again with it: culture-neurons select --out {out} {flag(name)} "
                f"{show(new)} --overwrite")  # fmt: skip
    else:
        todo = f"pass {flag(name)} {show(old)}, or start a new run (a new --out, or --overwrite)"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise UsageError(f"{where} {show(new)} differs from this run's {show(old)} "
                     f"({out / RUN_FILE}){more}; {todo}")  # fmt: skip


def changes(old: dict, new: dict, command: str) -> list[dict]:
    """The entries run.json's ``changes`` gains: every setting of ``new`` that differs."""
    return [{"step": command, "setting": k, "from": old[k], "to": v}
            for k, v in new.items() if k in old and _norm(old[k]) != _norm(v)]  # fmt: skip


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def settings_from_stats(stats_meta: dict) -> dict:
    """The identification settings that ``stats.json`` records (for a dir without run.json,
    e.g. statistics saved from Python)."""
    opts = stats_meta.get("options") or {}
    found = {"activation": stats_meta.get("activation"), "scope": stats_meta.get("scope"),
             "identify_on": opts.get("items"), "split_ratio": opts.get("split_ratio"),
             "seed": opts.get("seed")}  # fmt: skip
    return {k: v for k, v in found.items() if v is not None}


# -- masks and results against the run ------------------------------------------------------
def check_masks(out: Path, name: str, masks, config: RunConfig) -> None:
    """Refuse masks selected with other settings than the run's (``select`` records them in
    ``options["selection"]``)."""
    where = out / "masks" / f"{name}.safetensors"
    made = masks.options.get("selection")
    if not isinstance(made, dict):
        raise StatsMismatchError(f"{where} carries no selection settings (not written by "
                                 f"`select`); select again: culture-neurons select --out {out} "
                                 "--overwrite")  # fmt: skip
    want = config.settings("select")
    for key, value in want.items():
        if key in made and _norm(made[key]) != _norm(value):
            raise StatsMismatchError(
                f"{where} was selected with {flag(key)} {show(made[key])}, but this run's "
                f"settings say {show(value)} ({out / RUN_FILE}); select again: "
                f"culture-neurons select --out {out} --overwrite"
            )


def check_evals(out: Path) -> None:
    """Refuse eval JSONs computed under other masks than those now in ``OUT/masks``."""
    from culture_neurons.masks import load_masks

    hashes: dict[str, str] = {}
    for path in sorted((out / "eval").glob("*.json")):
        res = read_json(path, "run `evaluate` again")
        for stem, h in (res or {}).get("masks_hash", {}).items():
            if stem not in hashes:
                m = out / "masks" / f"{stem}.safetensors"
                hashes[stem] = load_masks(m).content_hash() if m.is_file() else "missing"
            if hashes[stem] != h:
                raise StatsMismatchError(
                    f"{path} was computed under other masks than {out}/masks/{stem}.safetensors "
                    f"({'now missing' if hashes[stem] == 'missing' else 'selected again since'})"
                    f"; evaluate again: culture-neurons evaluate --out {out}"
                )
