"""Items and their per-culture container, with the seeded identification / evaluation split."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from culture_neurons.data.images import ImageRef, decode_image, image_size
from culture_neurons.data.schema import HIDDEN_LABEL, LETTERS
from culture_neurons.errors import DataError, UsageError

logger = logging.getLogger(__name__)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that is the same on every run and machine.

    Python's ``hash()`` of a string changes per process (PYTHONHASHSEED), so splits seeded with it
    would not be reproducible.
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


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
        return self._read_image(decode_image, "decoded")

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels, read from the image's header (no pixels decoded)."""
        return self._read_image(image_size, "read")

    def _read_image(self, read, what: str):
        """``read(bytes)``, a failure of the image's own data as a DataError naming the item."""
        try:
            return read(self.image_ref.read_bytes())
        except DataError:
            raise
        except Exception as exc:  # PIL raises several types for corrupt data
            raise DataError(
                f"item {self.id!r}: its image cannot be {what} ({exc}); "
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
