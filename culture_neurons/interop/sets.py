"""One mask set as per-layer neuron lists, the shape every export needs."""

from __future__ import annotations

import torch

from culture_neurons.masks import Masks


def set_pairs(masks: Masks, culture: str | int) -> list[tuple[int, list[int]]]:
    """[(layer, sorted neuron indices)] of one set, layers with no neuron left out."""
    pairs = masks.pairs(culture)
    out = []
    for layer in torch.unique(pairs[:, 0]).tolist():
        out.append((int(layer), pairs[pairs[:, 0] == layer, 1].tolist()))
    return out
