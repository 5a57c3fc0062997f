"""Where the selected neurons sit: per-layer totals and the overlap of methods' sets."""

from __future__ import annotations

import numpy as np

from culture_neurons.masks import Masks, load_masks
from culture_neurons.report.files import RND, RunFiles, matrix

TOP_LAYERS = 3


def layer_totals(run: RunFiles, method: str) -> np.ndarray:
    """Selected neurons per layer, summed over cultures, float64 [L] (RND: mean over draws)."""
    counts = run.evals[method].get("layer_counts")
    if counts is None:  # older results: count from the masks file
        masks = load_masks_for(run, method)
        if not masks:
            return np.zeros(0)
        return np.mean([m.layer_counts().sum(0).double().numpy() for m in masks], axis=0)
    return matrix(counts).sum(axis=0)


def top_layers(totals: np.ndarray, k: int = TOP_LAYERS) -> list[tuple[int, float]]:
    """The ``k`` layers with most selected neurons, as (layer, count); ties go to lower layers."""
    order = sorted(range(len(totals)), key=lambda layer: (-totals[layer], layer))
    return [(layer, float(totals[layer])) for layer in order[:k] if totals[layer] > 0]


def load_masks_for(run: RunFiles, method: str) -> list[Masks]:
    """The method's masks (RND: every ``rnd<i>`` draw); empty when the files are absent."""
    mask_dir = run.out / "masks"
    if method != RND:
        path = mask_dir / f"{method}.safetensors"
        return [load_masks(path)] if path.is_file() else []
    draws = sorted(mask_dir.glob("rnd*.safetensors"), key=lambda p: draw_index(p.stem))
    return [load_masks(p) for p in draws if draw_index(p.stem) >= 0]


def draw_index(stem: str) -> int:
    """``rnd3`` -> 3; -1 for anything else."""
    tail = stem[len(RND) :]
    return int(tail) if stem.startswith(RND) and tail.isdigit() else -1


def same_culture_jaccard(a: Masks, b: Masks) -> float:
    """Mean over cultures of |A_c & B_c| / |A_c | B_c| (NaN pairs, two empty sets, skipped)."""
    common = [name for name in a.names if name in b.names]
    if not common:
        return float("nan")
    j = a.jaccard(b).numpy()
    vals = np.array([j[a.names.index(n), b.names.index(n)] for n in common])
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def overlap(run: RunFiles) -> tuple[list[str], np.ndarray] | None:
    """Mean same-culture Jaccard between methods, [M, M] (RND averaged over draws, NaN on the
    diagonal: a method against itself is trivially 1); None when no masks are stored."""
    masks = {m: load_masks_for(run, m) for m in run.evals}
    names = [m for m in run.evals if masks[m]]
    if len(names) < 2:
        return None
    out = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            out[i, j] = out[j, i] = np.nanmean(
                [same_culture_jaccard(x, y) for x in masks[a] for y in masks[b]]
            )
    return names, out
