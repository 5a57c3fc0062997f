"""Recording and ablation inside the model's forward pass.

- :mod:`.instrument`: :class:`Instrument`, :func:`record`, :func:`ablate` (attach to a model).
- :mod:`.rows`: token weights and per-row culture / set ids (one home for their rules).
- :mod:`.reduce`: THE per-culture reduction and per-row ablation every PyTorch path uses.
- :mod:`.totals`: :class:`Totals`, the device-resident K/S/Q/T every recording path adds into.
- :mod:`.hooks`, :mod:`.fused`: the two backends.
- :mod:`.functional`: the same numbers inside someone else's forward code (no patching).
"""

from culture_neurons.instrument.instrument import BACKENDS, Instrument, ablate, record, steer
from culture_neurons.instrument.totals import Totals

__all__ = ["BACKENDS", "Instrument", "Totals", "ablate", "record", "steer"]
