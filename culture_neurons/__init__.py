"""culture-neurons: find culture-sensitive neurons in vision-language models, test them by ablation.

    import culture_neurons as cn
    with cn.record(model, cultures) as rec:          # per-culture neuron statistics
        rec(culture_ids, **batch)
    stats = rec.stats()
    masks = cn.select(stats, "cas", ratio=0.005)     # top 0.5% neurons per culture
    with cn.ablate(model, masks) as abl:              # zero them, row by row
        abl(ablate=set_ids, **batch)
"""

__version__ = "0.1.0"

from .errors import CultureNeuronsError
from .evaluate import predict as evaluate
from .experiment import Run, RunConfig
from .instrument import Instrument, ablate, record
from .masks import Masks, load_masks
from .select import select
from .stats import Stats, load_stats

__all__ = [
    "CultureNeuronsError",
    "Instrument",
    "Masks",
    "Run",
    "RunConfig",
    "Stats",
    "ablate",
    "evaluate",
    "load_masks",
    "load_stats",
    "record",
    "select",
]
