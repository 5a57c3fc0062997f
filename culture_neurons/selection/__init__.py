"""Neuron selection: the selectors (:mod:`.methods`: cas lap lape mad rnd) over exact top-k and
order statistics (:mod:`.topk`, with the C++ twin ``culture_neurons._C``)."""

from culture_neurons.selection.methods import DEFAULT_RATIO, METHODS, select

__all__ = ["DEFAULT_RATIO", "METHODS", "select"]
