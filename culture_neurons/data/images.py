"""Images of CVQA items as references (encoded bytes, or where they live on disk), decoded on
access: 10k items cost their text plus, at most, the encoded bytes, never pixels."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from culture_neurons.errors import DataError

logger = logging.getLogger(__name__)


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
        return _image_bytes_at(arrow_table(self.path).column("image"), self.row, self)


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


def arrow_table(path: str) -> Any:
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


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of encoded image bytes from the header alone (PIL opens lazily), the
    size :func:`decode_image` gives."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return height, width


def check_image(data: bytes) -> None:
    """Cheap readability check (format header and, for PNG, chunk CRCs); no pixels decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.verify()
