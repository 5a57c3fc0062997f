"""Data: CVQA items grouped by culture, and synthetic data in the same schema.

- :mod:`.schema`: CVQA's columns and the loader's vocabulary (groupings, skip reasons).
- :mod:`.images`: image references, decoded on access.
- :mod:`.items`: ``Item`` and ``CultureData`` (``split`` gives the disjoint, seeded
  identification / evaluation parts).
- :mod:`.sources`: parquet files, a ``datasets`` save_to_disk folder, or the hub.
- :mod:`.cvqa`: rows -> items, and ``load_cvqa``.
- :mod:`.synthetic`: synthetic CVQA in CVQA's exact parquet schema; :mod:`.faker_text`:
  culture-specific sentences for the language-modelling task.
"""

from culture_neurons.data.cvqa import load_cvqa
from culture_neurons.data.items import CultureData, Item, stable_seed
from culture_neurons.data.schema import CVQA_COLUMNS, SKIP_REASONS
from culture_neurons.data.synthetic import make_synthetic_items, write_synthetic_cvqa

__all__ = [
    "CVQA_COLUMNS",
    "SKIP_REASONS",
    "CultureData",
    "Item",
    "load_cvqa",
    "make_synthetic_items",
    "stable_seed",
    "write_synthetic_cvqa",
]
