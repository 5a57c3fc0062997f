"""culture-neurons: find culture-sensitive neurons in vision-language models, test them by ablation.

    import culture_neurons as cn
    with cn.record(model, cultures) as rec:          # per-culture neuron statistics
        rec(culture_ids, **batch)
    stats = rec.stats()
    masks = cn.select(stats, "cas", ratio=0.005)     # top 0.5% neurons per culture
    with cn.ablate(model, masks) as abl:              # zero them, row by row
        abl(set_ids=set_ids, **batch)

Subpackages (each named for what it holds): ``models`` (all model knowledge), ``instrument``
(record / ablate, the one reduction), ``kernels`` (Triton), ``selection``, ``scoring``,
``pipeline`` (runs, CLI, distributed), ``report``, ``data``, ``interop``; ``demo`` (the toy)
and ``testing`` (tiny and planted models) stand apart and are never imported by the rest.
"""

__version__ = "0.1.0"

from culture_neurons.errors import CultureNeuronsError
from culture_neurons.instrument import Instrument, ablate, record, steer
from culture_neurons.masks import Masks, load_masks
from culture_neurons.pipeline import Run, RunConfig
from culture_neurons.scoring import evaluate
from culture_neurons.scoring.random_control import compare_to_random
from culture_neurons.selection import select
from culture_neurons.stats import Stats, load_stats

__all__ = [
    "CultureNeuronsError",
    "Instrument",
    "Masks",
    "Run",
    "RunConfig",
    "Stats",
    "ablate",
    "compare_to_random",
    "evaluate",
    "load_masks",
    "load_stats",
    "record",
    "select",
    "steer",
]
