"""Split-half stability of a run's selection, at no extra forward (RunConfig ``halves``).

Identification records 2C groups instead of C: group ``2 c + h`` holds the items of culture c
in half h, where ``h = stable_seed("half", item id) & 1`` (a sha256 of the id: the same on
every machine and run, never Python's salted ``hash()``). The same forwards fill them, and the
run's statistics are their sum (:func:`fold`). Counts are exact; sums agree with a recording
without halves to fp32 rounding (a forward sums each group's rows in fp32 before adding them
in fp64, and a culture's rows are then two partial sums). Deriving the whole from the halves
keeps the device totals at 2C, not 3C.

    OUT/stats.safetensors, stats.json      the whole (C cultures), as without halves
    OUT/halves/stats.safetensors, .json    the 2C groups, named "<culture> [half h]"

Each half is selected with the run's methods and options, and per method and culture the
two sets' Jaccard is compared with its expectation for random sets of their sizes
(:mod:`culture_neurons.selection.stability`); ``evaluate`` writes it into each method's eval
JSON (``stability``) and the report shows it.

Cost: the totals hold 2C x L x N x 24 bytes (K int64, S and Q float64) instead of C x ...:
at Qwen2.5-VL-7B width (28 layers x 18944 neurons) and 25 cultures, 636 MB instead of 318 MB
on the device, and the halves file adds 636 MB on disk (and to every checkpoint).
``--no-halves`` records the C cultures alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from culture_neurons.data import stable_seed
from culture_neurons.errors import CultureNeuronsError, DataError
from culture_neurons.selection.methods import select
from culture_neurons.selection.stability import overlap
from culture_neurons.stats import META_FILE, Stats, load_stats, merge_shards

log = logging.getLogger(__name__)

HALVES_DIR = "halves"
SPLIT = "half = (first 8 bytes of sha256('half' 0x1f item id), big-endian) >> 1 & 1"


def half_of(item_id: str) -> int:
    """0 or 1: the half of the identification items this item belongs to (module doc)."""
    return stable_seed("half", item_id) & 1


def group_names(cultures: list[str]) -> list[str]:
    """The 2C recording groups: ``2 c + h`` is culture c's half h."""
    return [f"{c} [half {h}]" for c in cultures for h in (0, 1)]


def group_ids(culture_ids: list[int], item_ids: list[str]) -> list[int]:
    """Each item's recording group ``2 c + half`` (``culture_ids``: indices into the run's
    cultures)."""
    return [2 * c + half_of(i) for c, i in zip(culture_ids, item_ids, strict=True)]


def fold(groups: Stats, cultures: list[str]) -> Stats:
    """The statistics of ``cultures`` from their 2C half groups: each culture's two halves
    added (counts exactly)."""
    _check_groups(groups, cultures)
    C = len(cultures)

    def pair_sum(t: torch.Tensor) -> torch.Tensor:
        return t.view(C, 2, *t.shape[1:]).sum(1)

    return Stats(cultures=list(cultures), fingerprint=groups.fingerprint,
                 activation=groups.activation, scope=groups.scope, T=pair_sum(groups.T),
                 K=pair_sum(groups.K), S=pair_sum(groups.S), Q=pair_sum(groups.Q),
                 items=pair_sum(groups.items), options=dict(groups.options),
                 shard=groups.shard)  # fmt: skip


def split(groups: Stats, cultures: list[str]) -> tuple[Stats, Stats]:
    """Half 0's and half 1's statistics, each over ``cultures``."""
    _check_groups(groups, cultures)

    def half(h: int) -> Stats:
        return Stats(cultures=list(cultures), fingerprint=groups.fingerprint,
                     activation=groups.activation, scope=groups.scope,
                     T=groups.T[h::2].clone(), K=groups.K[h::2].clone(),
                     S=groups.S[h::2].clone(), Q=groups.Q[h::2].clone(),
                     items=groups.items[h::2].clone(),
                     options={**groups.options, "half": h}, shard=groups.shard)  # fmt: skip

    return half(0), half(1)


def _check_groups(groups: Stats, cultures: list[str]) -> None:
    if groups.cultures != group_names(cultures):
        raise DataError(f"the half statistics hold groups {groups.cultures[:4]}..., not the "
                        f"halves of {cultures}; record the statistics again")  # fmt: skip


def save(groups: Stats, out: Path) -> None:
    """``OUT/halves/``: the 2C groups (module doc)."""
    groups.save(Path(out) / HALVES_DIR, extra={"split": SPLIT})


def load(out: Path, whole: Stats) -> Stats | None:
    """The 2C half groups of the run in ``out`` (None: recorded without halves); refused when
    they do not add up to ``whole`` (the run's statistics, e.g. replaced by a merge since)."""
    folder = Path(out) / HALVES_DIR
    if not (folder / META_FILE).is_file():
        return None
    groups = load_stats(folder)
    if groups.fingerprint != whole.fingerprint or not torch.equal(
            fold(groups, whole.cultures).K, whole.K):  # fmt: skip
        raise DataError(f"{folder} does not add up to the statistics in {out} (recorded on "
                        "other items or another model); record the statistics again, or "
                        f"delete {folder} to go without split-half stability")  # fmt: skip
    return groups


def merge(folders: list[Path], out: Path) -> None:
    """``merge``'s halves: the inputs' half groups added into ``OUT/halves`` when every input
    has them (else none: a warning says the merged run goes without stability)."""
    found = [Path(f) / HALVES_DIR for f in folders if (Path(f) / HALVES_DIR / META_FILE).is_file()]
    if len(found) == len(folders):
        save(merge_shards([load_stats(f) for f in found]), out)
    elif found:
        log.warning("only %d of the %d merged statistics hold split halves: the merged run has "
                    "no split-half stability", len(found), len(folders))  # fmt: skip


def stability(groups: Stats, cultures: list[str], config) -> dict[str, dict]:
    """Per method of ``config`` (a RunConfig): the split-half Jaccard per culture against its
    random expectation (:func:`culture_neurons.selection.stability.overlap`), with each half's
    items per culture; ``{"unavailable": why}`` where a half cannot be selected on (e.g. a
    culture without an item in one half)."""
    parts = split(groups, cultures)
    items = [[int(h.items[c]) for h in parts] for c in range(len(cultures))]
    empty = [f"{cultures[c]} (half {h})" for c in range(len(cultures)) for h in (0, 1)
             if int(parts[h].T[c]) == 0]  # fmt: skip
    out = {}
    for method in config.methods:
        if empty:
            out[method] = {"unavailable": "no token counted for " + ", ".join(empty)}
            continue
        try:
            a, b = (select(h, method, **config.selector_options(method)) for h in parts)
        except CultureNeuronsError as e:  # e.g. lape's bar selecting nothing on a half
            out[method] = {"unavailable": f"selection on a half failed: {e}"}
            continue
        out[method] = {**overlap(a, b, per_layer=config.per_layer), "items": items,
                       "split": SPLIT}  # fmt: skip
    return out


def of_run(out: Path, whole: Stats, config) -> dict[str, dict] | None:
    """:func:`stability` of the run in ``out``; None when it was recorded without halves, or
    with halves that do not add up to its statistics (a warning: the evaluation it ends
    stands without them)."""
    try:
        groups = load(out, whole)
    except DataError as e:
        log.warning("no split-half stability: %s", e)
        return None
    if groups is None:
        log.info("no split-half statistics in %s (recorded with --no-halves or by an older "
                 "version): the eval JSONs carry no stability", out)  # fmt: skip
        return None
    return stability(groups, whole.cultures, config)
