"""Where CVQA rows come from: parquet files, a ``datasets`` save_to_disk folder, or the hub."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from culture_neurons.data.images import ArrowImage, ImageRef, ParquetImage, arrow_table
from culture_neurons.data.schema import CVQA_COLUMNS, HUB_NAME, REQUIRED_COLUMNS
from culture_neurons.errors import DataError

# (rows, image reference of row i, where they come from): one parquet row group or arrow file.
_Batch = tuple[list[dict[str, Any]], Callable[[int], ImageRef], str]

logger = logging.getLogger(__name__)


@dataclass
class Source:
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


def _parquet_source(files: list[Path], description: str) -> Source:
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

    return Source(description, list(pq.read_schema(files[0]).names), batches)


def _arrow_source(files: list[Path], description: str) -> Source:
    for f in files:
        _check_columns(arrow_table(str(f)).column_names, f"Arrow file {f}")

    def batches() -> Iterator[_Batch]:
        for f in files:
            table = arrow_table(str(f))
            start = 0
            for batch in table.to_batches(max_chunksize=256):
                yield (
                    batch.to_pylist(),
                    (lambda i, f=f, s=start: ArrowImage(str(f), s + i)),
                    f"{f.name} rows {start}+",
                )
                start += batch.num_rows

    return Source(description, list(arrow_table(str(files[0])).column_names), batches)


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
    file_rows = sum(arrow_table(str(f)).num_rows for f in files)
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


def open_source(path: str | Path | None) -> Source:
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
