"""The resume point of every matrix mode: a log of finished groups of items.

A matrix is computed group by group (a group: some evaluation items under some conditions);
each finished group is appended to ``OUT/progress/<name>.jsonl`` as one JSON line
``{"key", "group", "items", "preds"}`` and fsynced before the next begins. A run stopped
anywhere (Ctrl-C, kill -9: a torn last line is ignored) continues from the groups on the log
whose ``key`` (model, masks, settings) and item ids are this run's; the others are dropped,
so the log never mixes results of two keys.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class GroupLog:
    """``with GroupLog(path, key, resume) as groups``: ``groups.done(g, ids)`` is group g's
    logged block (None: compute it), ``groups.add(g, ids, block)`` logs a finished one."""

    def __init__(self, path: Path, key: str, resume: bool):
        self.path, self.key = Path(path), key
        self._done = _read_groups(self.path, key) if resume else {}
        _rewrite_log(self.path, self._done)  # the log never mixes results of two keys
        self._file = None

    def __enter__(self) -> GroupLog:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed on exit)
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def done(self, group: int, ids: list[str], dtype: torch.dtype) -> torch.Tensor | None:
        """Group ``group``'s logged scores, if it was logged for the same items ``ids``."""
        rec = self._done.get(group)
        if rec is None or rec["items"] != ids:
            return None
        return torch.tensor(rec["preds"], dtype=dtype)

    def add(self, group: int, ids: list[str], block: torch.Tensor) -> None:
        """One finished group on the log, on disk before the next begins."""
        self._file.write(json.dumps({"key": self.key, "group": group, "items": ids,
                                     "preds": block.tolist()}) + "\n")  # fmt: skip
        self._file.flush()
        os.fsync(self._file.fileno())


def _read_groups(path: Path, key: str) -> dict[int, dict]:
    """Finished groups of the progress log computed under ``key``; a torn last line (kill -9)
    is ignored, groups of another key (model, masks, settings) are counted and dropped."""
    done, other = {}, 0
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("key") == key:
            done[rec["group"]] = rec
        else:
            other += 1
    if other:
        log.info("%s: %d group(s) were computed for another model, other masks or settings: "
                 "computing them again", path.name, other)  # fmt: skip
    return done


def _rewrite_log(path: Path, done: dict[int, dict]) -> None:
    """The progress log holding exactly ``done`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in done.values()), encoding="utf-8")
    os.replace(tmp, path)
