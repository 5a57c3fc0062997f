"""Data: CVQA items grouped by culture, and synthetic CVQA in the same schema.

``load_cvqa`` reads CVQA (parquet files, a ``datasets`` save_to_disk folder, or the hub) into a
``CultureData`` of ``Item``s; ``CultureData.split`` gives the disjoint, seeded identification /
evaluation parts; ``write_synthetic_cvqa`` writes small data in CVQA's exact parquet schema.
"""

from culture_neurons.data.cvqa import (
    CVQA_COLUMNS,
    SKIP_REASONS,
    CultureData,
    Item,
    load_cvqa,
    stable_seed,
)
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
