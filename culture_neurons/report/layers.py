"""Where the selected neurons sit: per-layer totals and the overlap of methods' sets."""

from __future__ import annotations

import numpy as np

from culture_neurons.masks import Masks, load_masks
from culture_neurons.report.files import RunFiles, matrix

TOP_LAYERS = 3


def layer_counts(run: RunFiles, method: str) -> np.ndarray | None:
    """Selected neurons per culture and layer, float64 [C, L], from the eval JSON (older
    results: from the masks file); None when neither has them."""
    counts = run.evals[method].get("layer_counts")
    if counts is not None:
        return matrix(counts)
    masks = load_masks_for(run, method)
    return masks.layer_counts().double().numpy() if masks is not None else None


def layer_totals(run: RunFiles, method: str) -> np.ndarray:
    """Selected neurons per layer, summed over cultures, float64 [L]."""
    counts = layer_counts(run, method)
    return counts.sum(axis=0) if counts is not None else np.zeros(0)


def top_layers(totals: np.ndarray, k: int = TOP_LAYERS) -> list[tuple[int, float]]:
    """The ``k`` layers with most selected neurons, as (layer, count); ties go to lower layers."""
    order = sorted(range(len(totals)), key=lambda layer: (-totals[layer], layer))
    return [(layer, float(totals[layer])) for layer in order[:k] if totals[layer] > 0]


def load_masks_for(run: RunFiles, name: str) -> Masks | None:
    """The masks ``masks/<name>.safetensors`` of a method or RND draw; None when absent."""
    path = run.out / "masks" / f"{name}.safetensors"
    return load_masks(path) if path.is_file() else None


def rnd_draws_for(run: RunFiles, method: str) -> list[Masks]:
    """The method's RND draws (the masks its JSON names), as far as their files exist."""
    names = (run.evals[method].get("rnd") or {}).get("masks", [])
    return [m for m in (load_masks_for(run, n) for n in names) if m is not None]


def same_culture_jaccard(a: Masks, b: Masks) -> float:
    """Mean over cultures of |A_c & B_c| / |A_c | B_c| (NaN pairs, two empty sets, skipped)."""
    common = [name for name in a.names if name in b.names]
    if not common:
        return float("nan")
    j = a.jaccard(b).numpy()
    vals = np.array([j[a.names.index(n), b.names.index(n)] for n in common])
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def overlap(run: RunFiles) -> tuple[list[str], np.ndarray, dict[str, float]] | None:
    """Mean same-culture Jaccard between methods, [M, M] (NaN on the diagonal: a method against
    itself is trivially 1), and each method's mean Jaccard with its own RND draws (what chance
    gives at its sizes); None when fewer than two methods have masks stored."""
    masks = {m: load_masks_for(run, m) for m in run.evals}
    names = [m for m in run.evals if masks[m] is not None]
    if len(names) < 2:
        return None
    out = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            out[i, j] = out[j, i] = same_culture_jaccard(masks[a], masks[names[j]])
    chance = {}
    for m in names:
        draws = rnd_draws_for(run, m)
        if draws:
            chance[m] = float(np.nanmean([same_culture_jaccard(masks[m], d) for d in draws]))
    return names, out, chance
