"""CVQA items, per-culture containers and the loader (SPEC "CVQA").

CVQA (``afaji/cvqa``, one ``test`` split) has the columns::

    image  ID  Subset  Question  Translated Question  Options  Translated Options
    Label  Category  Image Type  Image Source  License

``image`` is a struct ``{bytes, path}``, ``Subset`` a string such as ``"('Japanese', 'Japan')"``,
``Options`` / ``Translated Options`` lists of 4 strings (local language / English) and
``Label`` the index 0-3 of the right option, or -1 where the public copy hides it.

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
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from culture_neurons.errors import DataError, UsageError

logger = logging.getLogger(__name__)

CVQA_COLUMNS = (
    "image",
    "ID",
    "Subset",
    "Question",
    "Translated Question",
    "Options",
    "Translated Options",
    "Label",
    "Category",
    "Image Type",
    "Image Source",
    "License",
)
# The loader needs these; the last four are metadata and may be absent from derived copies.
REQUIRED_COLUMNS = CVQA_COLUMNS[:8]
NUM_OPTIONS = 4
LETTERS = "ABCD"
HIDDEN_LABEL = -1
HUB_NAME = "afaji/cvqa"

GROUPINGS = ("pair", "country")
LANGUAGES = ("en", "local")
ON_ERROR = ("raise", "skip")

# Why an item can be skipped with on_error="skip" (keys of CultureData.skipped).
SKIP_REASONS = (
    "missing_field",  # ID, Subset, the chosen language's question/options, Label or image empty
    "bad_subset",  # Subset is not a (language, country) pair
    "bad_image",  # the image bytes cannot be read by PIL
    "bad_options",  # not a list of 4 strings
    "bad_label",  # not an integer in -1..3
    "duplicate_id",  # a later row with an ID seen before (the first one is kept)
    "hidden_label",  # Label -1 among labelled items (see the module docstring)
)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that is the same on every run and machine.

    Python's ``hash()`` of a string changes per process (PYTHONHASHSEED), so splits seeded with it
    would not be reproducible.
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# Images: references decoded on access
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InMemoryImage:
    """Encoded image bytes (PNG, JPEG...) held in memory."""

    data: bytes = field(repr=False)

    def read_bytes(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class FileImage:
    """An image file on disk (a ``datasets`` Image whose bytes were not embedded)."""

    path: str

    def read_bytes(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class ParquetImage:
    """Row ``row`` of row group ``row_group`` of a parquet file's ``image`` column.

    Reading one image reads its row group (HF writes ~100 images per group); the last few
    groups are cached, so walking items in file order reads each group once.
    """

    path: str
    row_group: int
    row: int

    def read_bytes(self) -> bytes:
        return _image_bytes_at(_parquet_image_column(self.path, self.row_group), self.row, self)


@dataclass(frozen=True)
class ArrowImage:
    """Row ``row`` of an Arrow stream file (``datasets`` cache / save_to_disk), memory-mapped."""

    path: str
    row: int

    def read_bytes(self) -> bytes:
        return _image_bytes_at(_arrow_table(self.path).column("image"), self.row, self)


ImageRef = InMemoryImage | FileImage | ParquetImage | ArrowImage


def _file_key(path: str) -> tuple[str, int, int]:
    # Cache keys carry the file's mtime and size, so a rewritten file is never served stale.
    st = Path(path).stat()
    return path, st.st_mtime_ns, st.st_size


def _parquet_image_column(path: str, row_group: int) -> Any:
    return _parquet_image_column_cached(_file_key(path), row_group)


@lru_cache(maxsize=4)
def _parquet_image_column_cached(key: tuple[str, int, int], row_group: int) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(key[0]).read_row_group(row_group, columns=["image"]).column("image")


def _arrow_table(path: str) -> Any:
    return _arrow_table_cached(_file_key(path))


@lru_cache(maxsize=16)
def _arrow_table_cached(key: tuple[str, int, int]) -> Any:
    # A memory map: the table's buffers are pages of the file, not copies in RAM.
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(key[0])).read_all()


def _image_bytes_at(column: Any, row: int, ref: object) -> bytes:
    value = column[row].as_py()
    if value and value.get("bytes") is not None:
        return value["bytes"]
    if value and value.get("path") and Path(value["path"]).is_file():
        return Path(value["path"]).read_bytes()
    raise DataError(f"{ref}: the image has neither bytes nor a readable path; re-download the data")


def decode_image(data: bytes) -> Any:
    """Decode encoded image bytes into an RGB ``PIL.Image.Image``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _check_image(data: bytes) -> None:
    """Cheap readability check (format header and, for PNG, chunk CRCs); no pixels decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.verify()


# ---------------------------------------------------------------------------------------------
# Items and the per-culture container
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One multiple-choice question about one image.

    ``question`` / ``options`` are in the language chosen at load time (``"en"``: CVQA's
    translations, ``"local"``: the original); ``*_en`` and ``*_local`` keep both where present.
    ``label`` is the index 0-3 of the right option, or -1 when the data hides it.
    The image is decoded on each access of ``image`` (never cached, to bound memory).
    """

    id: str
    culture: str
    question: str
    options: tuple[str, ...]
    label: int
    image_ref: ImageRef = field(repr=False, compare=False)
    category: str = ""
    language: str = ""  # CVQA Subset's language, e.g. "Japanese"
    country: str = ""  # CVQA Subset's country, e.g. "Japan"
    question_en: str | None = None
    options_en: tuple[str, ...] | None = None
    question_local: str | None = None
    options_local: tuple[str, ...] | None = None

    @property
    def image(self) -> Any:
        """The image as an RGB ``PIL.Image.Image``, decoded now."""
        try:
            return decode_image(self.image_ref.read_bytes())
        except DataError:
            raise
        except Exception as exc:  # PIL raises several types for corrupt data
            raise DataError(
                f"item {self.id!r}: its image cannot be decoded ({exc}); "
                "drop the item or re-download the data"
            ) from exc

    def image_bytes(self) -> bytes:
        """The encoded image bytes as stored."""
        return self.image_ref.read_bytes()

    @property
    def answer_letter(self) -> str | None:
        """``"A"``-``"D"`` for the right option, None when the label is hidden."""
        return None if self.label == HIDDEN_LABEL else LETTERS[self.label]


@dataclass(frozen=True)
class CultureData:
    """Items grouped by culture: C cultures, sorted by name.

    ``skipped`` counts the items the loader skipped per reason (``SKIP_REASONS``),
    ``skipped_ids`` names them, ``dropped_cultures`` maps each culture left out for having fewer
    than ``min_items`` items to its count. A split keeps these of the load it came from.
    """

    items_by_culture: Mapping[str, tuple[Item, ...]]
    labels_available: bool
    grouping: str = "pair"
    language: str = "en"
    source: str = ""
    skipped: Mapping[str, int] = field(default_factory=dict)
    skipped_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    dropped_cultures: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = {c: tuple(self.items_by_culture[c]) for c in sorted(self.items_by_culture)}
        object.__setattr__(self, "items_by_culture", ordered)

    @property
    def cultures(self) -> list[str]:
        """Culture names, sorted; index c of every ``[C, ...]`` tensor follows this order."""
        return list(self.items_by_culture)

    def culture_index(self, culture: str) -> int:
        """Row of ``culture`` in ``[C, ...]`` tensors."""
        try:
            return self.cultures.index(culture)
        except ValueError:
            raise DataError(
                f"culture {culture!r} is not in this data; available: {', '.join(self.cultures)}"
            ) from None

    def __len__(self) -> int:
        return sum(len(items) for items in self.items_by_culture.values())

    def __iter__(self) -> Iterator[Item]:
        """Every item, culture by culture in sorted order, file order within a culture."""
        for items in self.items_by_culture.values():
            yield from items

    def counts(self) -> dict[str, int]:
        """Items per culture."""
        return {c: len(items) for c, items in self.items_by_culture.items()}

    def split(self, ratio: float = 0.5, seed: int = 0) -> tuple[CultureData, CultureData]:
        """Disjoint ``(identification, evaluation)`` parts, split per culture.

        Each culture's items are ordered by ``stable_seed(seed, culture, item id)`` and the
        first ``round(ratio * n)`` go to identification (at least one item to each side when a
        culture has two or more). The order depends only on the seed, the culture and the ids,
        so the same seed gives the same split, and adding or removing a culture (or reordering
        the files) leaves the other cultures' splits unchanged. Items keep file order in each part.
        """
        if not 0.0 < ratio < 1.0:
            raise UsageError(f"split ratio={ratio!r} must be strictly between 0 and 1, e.g. 0.5")
        identification: dict[str, tuple[Item, ...]] = {}
        evaluation: dict[str, tuple[Item, ...]] = {}
        for culture, items in self.items_by_culture.items():
            chosen = _identification_ids(items, culture, ratio, seed)
            identification[culture] = tuple(it for it in items if it.id in chosen)
            evaluation[culture] = tuple(it for it in items if it.id not in chosen)
        return (
            replace(self, items_by_culture=identification),
            replace(self, items_by_culture=evaluation),
        )


def _identification_ids(items: tuple[Item, ...], culture: str, ratio: float, seed: int) -> set[str]:
    n = len(items)
    take = round(ratio * n)
    if n >= 2:
        take = min(max(take, 1), n - 1)
    ranked = sorted(items, key=lambda it: (stable_seed(seed, culture, it.id), it.id))
    return {it.id for it in ranked[:take]}


# ---------------------------------------------------------------------------------------------
# Rows -> items
# ---------------------------------------------------------------------------------------------


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
        _check_image(data)
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


# ---------------------------------------------------------------------------------------------
# Sources: parquet files, Arrow stream files (save_to_disk / datasets cache), the hub
# ---------------------------------------------------------------------------------------------

# A batch of rows (dicts of the CVQA columns) and a function giving row i's lazy image reference.
_Batch = tuple[list[dict[str, Any]], Callable[[int], ImageRef], str]


@dataclass
class _Source:
    description: str
    columns: list[str]
    batches: Callable[[], Iterator[_Batch]]


def _check_columns(columns: Iterable[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in set(columns)]
    if missing:
        raise DataError(
            f"{where} is not CVQA-shaped: missing column(s) {', '.join(map(repr, missing))}; "
            f"expected the CVQA columns {', '.join(CVQA_COLUMNS)} (the last four optional). "
            "Pass the folder of afaji/cvqa's parquet files or a datasets.save_to_disk folder"
        )


def _parquet_source(files: list[Path], description: str) -> _Source:
    import pyarrow.parquet as pq

    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for broken files
            raise DataError(
                f"parquet file {f} cannot be read ({exc}); re-download it or remove it"
            ) from exc
        _check_columns(names, f"parquet file {f}")

    def batches() -> Iterator[_Batch]:
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                rows = pf.read_row_group(g).to_pylist()
                yield rows, (lambda i, f=f, g=g: ParquetImage(str(f), g, i)), f"{f.name} group {g}"

    return _Source(description, list(pq.read_schema(files[0]).names), batches)


def _arrow_source(files: list[Path], description: str) -> _Source:
    for f in files:
        _check_columns(_arrow_table(str(f)).column_names, f"Arrow file {f}")

    def batches() -> Iterator[_Batch]:
        for f in files:
            table = _arrow_table(str(f))
            start = 0
            for batch in table.to_batches(max_chunksize=256):
                yield (
                    batch.to_pylist(),
                    (lambda i, f=f, s=start: ArrowImage(str(f), s + i)),
                    f"{f.name} rows {start}+",
                )
                start += batch.num_rows

    return _Source(description, list(_arrow_table(str(files[0])).column_names), batches)


def _saved_dataset_files(folder: Path) -> list[Path]:
    """Arrow files of a ``datasets`` save_to_disk folder (a Dataset, or a DatasetDict's test)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if "test" in splits:
            folder = folder / "test"
        elif len(splits) == 1:
            folder = folder / splits[0]
        else:
            raise DataError(
                f"{folder} holds splits {splits} and none is 'test' (CVQA's only split); "
                "pass the split's own folder"
            )
    try:
        import datasets  # optional: it knows every save_to_disk layout
    except ImportError:
        # Without it, state.json names the Arrow stream files (the layout since datasets 2.x).
        try:
            state = json.loads((folder / "state.json").read_text())
            return [folder / f["filename"] for f in state["_data_files"]]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{folder} is not a readable datasets.save_to_disk folder ({exc}); "
                "pip install datasets, or pass the parquet files instead"
            ) from exc
    ds = datasets.load_from_disk(str(folder))
    return _dataset_files(ds, str(folder))


def _dataset_files(ds: Any, where: str) -> list[Path]:
    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", [])]
    # A selection of rows (an indices mapping, or a contiguous select kept as a slice of the
    # same files) would make the files' rows differ from the dataset's: refuse rather than guess.
    file_rows = sum(_arrow_table(str(f)).num_rows for f in files)
    if not files or getattr(ds, "_indices", None) is not None or file_rows != len(ds):
        raise DataError(
            f"{where}: the dataset is not backed by plain Arrow files (in memory, or a selection "
            "of rows); save it with Dataset.save_to_disk and pass that folder"
        )
    return files


def _hub_files() -> list[Path]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "load_cvqa(path=None) needs the `datasets` package to fetch afaji/cvqa, and it is not "
            "installed; pip install datasets, or pass path= to a local copy (parquet files or a "
            "save_to_disk folder)"
        ) from None
    try:
        ds = datasets.load_dataset(HUB_NAME, split="test")
    except Exception as exc:
        raise DataError(
            f"could not load {HUB_NAME} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "no hub may be reachable from here: pass path= to a local copy (parquet files or a "
            "save_to_disk folder)"
        ) from exc
    return _dataset_files(ds, HUB_NAME)


def _open_source(path: str | Path | None) -> _Source:
    if path is None:
        files = _hub_files()
        return _arrow_source(files, HUB_NAME)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"CVQA path {p} does not exist; pass a parquet file or a folder")
    if p.is_file():
        if p.suffix == ".arrow":
            return _arrow_source([p], str(p))
        if p.suffix != ".parquet":
            raise DataError(f"{p} is neither a .parquet nor an .arrow file; pass CVQA's parquet")
        return _parquet_source([p], str(p))
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        return _arrow_source(_saved_dataset_files(p), str(p))
    files = sorted(p.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"{p} holds no *.parquet files and is not a datasets.save_to_disk folder "
            "(no state.json / dataset_dict.json); pass the folder of CVQA's parquet files"
        )
    return _parquet_source(files, str(p))


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


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


def _read_items(source: _Source, grouping: str, language: str, skips: _Skips) -> list[Item]:
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
    source = _open_source(path)
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
