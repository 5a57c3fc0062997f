"""The CVQA loader (SPEC "CVQA"): rows (schema in :mod:`.schema`) become items grouped by culture.

Choices made here (each an option with a named default):

- Cultures are the (language, country) pairs of CVQA, named ``"Japanese-Japan"``
  (``grouping="pair"``), or countries (``grouping="country"``).
- Items keep their image as a reference (encoded bytes, or where they live on disk) and decode
  it on access, so 10k items cost their text plus, at most, the encoded bytes: never pixels.
- Hidden labels: if every selected item has ``Label == -1``, ``labels_available`` is False and a
  warning says that accuracy cannot be computed (only flip rates and agreement). A *mix* of
  hidden and present labels is an error, since accuracy over part of a culture would
  silently mean something else; with ``on_error="skip"`` the hidden-label items are skipped
  (counted under ``"hidden_label"``) and the labelled ones kept.
- Nothing is dropped silently: skipped items are counted per reason in
  ``CultureData.skipped`` (one warning sums them up), dropped cultures in
  ``CultureData.dropped_cultures``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from culture_neurons.data.images import FileImage, ImageRef, InMemoryImage, check_image
from culture_neurons.data.items import CultureData, Item, stable_seed
from culture_neurons.data.schema import GROUPINGS, HIDDEN_LABEL, LANGUAGES, NUM_OPTIONS, ON_ERROR
from culture_neurons.data.sources import Source, open_source
from culture_neurons.errors import DataError, UsageError

logger = logging.getLogger(__name__)


class _BadRow(Exception):
    """One row cannot become an item; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, item: str, detail: str) -> None:
        super().__init__(f"{item}: {detail}")
        self.reason = reason
        self.item = item
        self.detail = detail


def culture_name(language: str, country: str, grouping: str = "pair") -> str:
    """The culture an item of CVQA Subset ``(language, country)`` belongs to."""
    return f"{language}-{country}" if grouping == "pair" else country


def parse_subset(text: object, item: str = "item") -> tuple[str, str]:
    """``"('Japanese', 'Japan')"`` -> ``("Japanese", "Japan")``; literals only, never code."""
    if isinstance(text, (tuple, list)):
        value: object = tuple(text)
    elif isinstance(text, str) and len(text) < 1000:
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
    else:
        value = None
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise _BadRow(
            "bad_subset",
            item,
            f"Subset {text!r} is not a (language, country) pair such as \"('Japanese', 'Japan')\"",
        )
    return value[0].strip(), value[1].strip()


def _text(row: Mapping[str, Any], column: str, item: str, required: bool) -> str | None:
    value = row.get(column)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if required:
        raise _BadRow("missing_field", item, f"{column!r} is empty or missing ({value!r})")
    return None


def _options(row: Mapping[str, Any], column: str, item: str, required: bool) -> tuple | None:
    value = row.get(column)
    # Early CVQA revisions stored the options as the text of a Python list.
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if len(value) < 100_000 else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
    if value is None:
        if required:
            raise _BadRow("missing_field", item, f"{column!r} is missing")
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        if required:
            raise _BadRow("bad_options", item, f"{column!r} is not a list of strings: {value!r}")
        return None
    options = tuple(v.strip() for v in value)
    if required and len(options) != NUM_OPTIONS:
        raise _BadRow(
            "bad_options",
            item,
            f"{column!r} has {len(options)} options, expected {NUM_OPTIONS}: {list(options)!r}",
        )
    return options


def _label(row: Mapping[str, Any], item: str) -> int:
    value = row.get("Label")
    if value is None:
        raise _BadRow("missing_field", item, "'Label' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < NUM_OPTIONS:
        raise _BadRow(
            "bad_label", item, f"Label {value!r} is not an option index 0-3 (or -1 for hidden)"
        )
    return int(value)


def _image_ref(row: Mapping[str, Any], item: str, ref: ImageRef | None) -> ImageRef:
    """Check the row's image is readable; return ``ref`` (lazy) or an in-memory copy."""
    value = row.get("image")
    data = None
    path = None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    if data is None and path and Path(path).is_file():
        data, ref = Path(path).read_bytes(), FileImage(str(path))
    if data is None:
        raise _BadRow("missing_field", item, "'image' has no bytes (and no readable file path)")
    try:
        check_image(data)
    except Exception as exc:  # PIL raises several types for corrupt data
        raise _BadRow("bad_image", item, f"the image cannot be read ({exc})") from exc
    return ref if ref is not None else InMemoryImage(bytes(data))


def item_from_row(
    row: Mapping[str, Any],
    *,
    grouping: str = "pair",
    language: str = "en",
    where: str = "",
    image_ref: ImageRef | None = None,
) -> Item:
    """Build an :class:`Item` from one CVQA row (a dict of the CVQA columns).

    ``where`` names the row in messages when it has no ID; ``image_ref`` is a lazy reference to
    the row's image (default: keep the row's bytes in memory). Raises ``DataError``.
    """
    try:
        return _item_from_row(row, grouping, language, where, image_ref)
    except _BadRow as bad:
        raise DataError(f"{bad}; fix the row or load with on_error='skip'") from None


def _item_from_row(
    row: Mapping[str, Any],
    grouping: str,
    language: str,
    where: str,
    image_ref: ImageRef | None,
) -> Item:
    raw_id = row.get("ID")
    item_id = str(raw_id).strip() if raw_id is not None else ""
    item = f"item {item_id!r}" if item_id else f"item at {where or 'unknown row'} (no ID)"
    if not item_id:
        raise _BadRow("missing_field", item, "'ID' is empty or missing")
    if row.get("Subset") is None:
        raise _BadRow("missing_field", item, "'Subset' is missing")
    lang, country = parse_subset(row.get("Subset"), item)
    local = language == "local"
    question_en = _text(row, "Translated Question", item, required=not local)
    question_local = _text(row, "Question", item, required=local)
    options_en = _options(row, "Translated Options", item, required=not local)
    options_local = _options(row, "Options", item, required=local)
    label = _label(row, item)
    ref = _image_ref(row, item, image_ref)
    return Item(
        id=item_id,
        culture=culture_name(lang, country, grouping),
        question=question_local if local else question_en,  # type: ignore[arg-type]
        options=options_local if local else options_en,  # type: ignore[arg-type]
        label=label,
        image_ref=ref,
        category=str(row.get("Category") or ""),
        language=lang,
        country=country,
        question_en=question_en,
        options_en=options_en,
        question_local=question_local,
        options_local=options_local,
    )


@dataclass
class _Skips:
    """Skipped items per reason, reported once."""

    on_error: str
    counts: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, bad: _BadRow) -> None:
        if self.on_error == "raise":
            raise DataError(f"{bad}; fix the data or load with on_error='skip'") from None
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        self.ids.setdefault(bad.reason, []).append(bad.item)


def _read_items(source: Source, grouping: str, language: str, skips: _Skips) -> list[Item]:
    items: list[Item] = []
    seen: set[str] = set()
    for rows, ref_of, where in source.batches():
        for i, row in enumerate(rows):
            try:
                item = _item_from_row(row, grouping, language, f"{where} row {i}", ref_of(i))
                if item.id in seen:
                    raise _BadRow("duplicate_id", f"item {item.id!r}", "this ID appears twice")
            except _BadRow as bad:
                skips.add(bad)
                continue
            seen.add(item.id)
            items.append(item)
    return items


def _select_cultures(
    groups: dict[str, list[Item]], cultures: Iterable[str] | None
) -> dict[str, list[Item]]:
    if cultures is None:
        return groups
    wanted = list(dict.fromkeys(cultures))
    unknown = [c for c in wanted if c not in groups]
    if unknown:
        raise DataError(
            f"unknown culture(s) {', '.join(map(repr, unknown))}; available: "
            f"{', '.join(sorted(groups))}"
        )
    return {c: groups[c] for c in wanted}


def _reconcile_labels(groups: dict[str, list[Item]], skips: _Skips) -> bool:
    """True when labels are available; skips hidden-label items in a mix (on_error='skip')."""
    hidden = [it for items in groups.values() for it in items if it.label == HIDDEN_LABEL]
    total = sum(len(items) for items in groups.values())
    if not hidden:
        return True
    if len(hidden) == total:
        return False
    for it in hidden:
        skips.add(
            _BadRow(
                "hidden_label",
                f"item {it.id!r}",
                f"its label is hidden (-1) while {total - len(hidden)} of {total} selected items "
                "have labels, so accuracy would be computed over part of the data",
            )
        )
    for culture in groups:
        groups[culture] = [it for it in groups[culture] if it.label != HIDDEN_LABEL]
    return True


def _apply_min_items(
    groups: dict[str, list[Item]], min_items: int, explicit: bool
) -> tuple[dict[str, list[Item]], dict[str, int]]:
    small = {c: len(items) for c, items in groups.items() if len(items) < min_items}
    if small and explicit:
        raise DataError(
            f"culture(s) with fewer than min_items={min_items} items: "
            f"{', '.join(f'{c} ({n})' for c, n in sorted(small.items()))}; "
            "lower min_items or leave them out of `cultures`"
        )
    if small:
        logger.warning(
            "CVQA: dropped %d culture(s) with fewer than min_items=%d items: %s",
            len(small),
            min_items,
            ", ".join(f"{c} ({n})" for c, n in sorted(small.items())),
        )
    return {c: items for c, items in groups.items() if c not in small}, small


def _cap(items: list[Item], culture: str, max_items: int | None) -> list[Item]:
    """At most ``max_items`` items, chosen by a hash of their ids (not file order, which may
    cluster by category), kept in file order."""
    if max_items is None or len(items) <= max_items:
        return items
    ranked = sorted(items, key=lambda it: (stable_seed("cap", culture, it.id), it.id))
    keep = {it.id for it in ranked[:max_items]}
    return [it for it in items if it.id in keep]


def _check_arguments(
    grouping: str, language: str, on_error: str, min_items: int, max_items: int | None
) -> None:
    for name, value, choices in (
        ("grouping", grouping, GROUPINGS),
        ("language", language, LANGUAGES),
        ("on_error", on_error, ON_ERROR),
    ):
        if value not in choices:
            raise UsageError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    if isinstance(min_items, bool) or not isinstance(min_items, int) or min_items < 1:
        raise UsageError(f"min_items={min_items!r} must be an integer >= 1")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise UsageError(f"max_items_per_culture={max_items!r} must be None or an integer >= 1")


def load_cvqa(
    path: str | Path | None = None,
    *,
    grouping: Literal["pair", "country"] = "pair",
    min_items: int = 50,
    cultures: Iterable[str] | None = None,
    language: Literal["en", "local"] = "en",
    on_error: Literal["raise", "skip"] = "raise",
    max_items_per_culture: int | None = None,
) -> CultureData:
    """Load CVQA into per-culture items.

    Args:
        path: a parquet file, a folder of ``*.parquet`` files (searched recursively, e.g. the
            downloaded ``data/test-0000x-of-0000y.parquet``), a ``datasets`` save_to_disk folder,
            or None for ``datasets.load_dataset("afaji/cvqa", split="test")``.
        grouping: ``"pair"``: one culture per CVQA (language, country) pair, named
            ``"Language-Country"``; ``"country"``: one per country.
        min_items: cultures with fewer items are dropped (a warning lists them); naming such a
            culture in ``cultures`` is an error.
        cultures: the cultures to keep (unknown names are an error listing the available ones);
            default: every culture with at least ``min_items`` items.
        language: ``"en"``: ``Translated Question`` / ``Translated Options``;
            ``"local"``: ``Question`` / ``Options``.
        on_error: ``"raise"``: the first bad item raises a ``DataError`` naming it;
            ``"skip"``: bad items are skipped, counted per reason in ``.skipped`` and summed up in
            one warning.
        max_items_per_culture: keep at most this many items per culture (chosen by a stable hash
            of the item ids), e.g. for quick runs.

    Returns:
        ``CultureData`` with cultures sorted by name. ``labels_available`` is False when every
        label is hidden (-1): then accuracy cannot be computed, only flip rates and agreement.

    Raises:
        DataError: missing path or columns, a bad item (with ``on_error="raise"``), a mix of
            hidden and present labels (with ``on_error="raise"``), an unknown culture, or no
            culture left.
        UsageError: an argument out of range.
    """
    _check_arguments(grouping, language, on_error, min_items, max_items_per_culture)
    source = open_source(path)
    skips = _Skips(on_error)
    items = _read_items(source, grouping, language, skips)

    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.culture, []).append(item)
    groups = _select_cultures(groups, cultures)
    labels_available = _reconcile_labels(groups, skips)
    groups, dropped = _apply_min_items(groups, min_items, explicit=cultures is not None)
    if not groups:
        raise DataError(
            f"no culture of {source.description} has at least min_items={min_items} items "
            f"(read {len(items)} items, skipped {sum(skips.counts.values())}); lower min_items"
        )
    groups = {c: _cap(its, c, max_items_per_culture) for c, its in groups.items()}

    if skips.counts:
        logger.warning(
            "CVQA: skipped %d item(s) of %s (on_error='skip'): %s; first ones: %s",
            sum(skips.counts.values()),
            source.description,
            ", ".join(f"{reason}={n}" for reason, n in sorted(skips.counts.items())),
            "; ".join(f"{r}: {', '.join(ids[:3])}" for r, ids in sorted(skips.ids.items())),
        )
    if not labels_available:
        logger.warning(
            "CVQA: every label in %s is hidden (-1): accuracy cannot be computed, only flip "
            "rates and agreement with the unablated model",
            source.description,
        )
    data = CultureData(
        items_by_culture={c: tuple(its) for c, its in groups.items()},
        labels_available=labels_available,
        grouping=grouping,
        language=language,
        source=source.description,
        skipped=dict(skips.counts),
        skipped_ids={r: tuple(ids) for r, ids in skips.ids.items()},
        dropped_cultures=dropped,
    )
    logger.info(
        "CVQA: %d items in %d cultures from %s", len(data), len(data.cultures), source.description
    )
    return data
