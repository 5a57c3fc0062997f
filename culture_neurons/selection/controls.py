"""A run's selection (SPEC "Controls"): every configured method's masks and, as each method's
control, ``rnd_draws`` uniform random sets of its own per-culture sizes; what their names are
and when a selection is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from culture_neurons.data import stable_seed
from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks
from culture_neurons.selection.methods import select
from culture_neurons.stats import Stats

if TYPE_CHECKING:
    from culture_neurons.pipeline.config import RunConfig

log = logging.getLogger(__name__)


def select_all(stats: Stats, config: RunConfig, out: Path | None = None) -> dict[str, Masks]:
    """Masks of every configured method, then each method's RND control: ``rnd_draws``
    uniform random sets of that method's own per-culture sizes (per layer with ``per_layer``),
    named as :func:`rnd_draws_of` says; saved to ``out/masks`` when ``out`` is given. Each
    carries the run's selection settings (``options["selection"]``).

    Methods whose sets have identical sizes share one series of draws: each method's p-value
    against it stays exact (its null is still uniform sets of its own sizes, independent of its
    selection); only their p-values are then correlated. The draws are seeded by the run's seed
    and the sizes, so the same sizes always get the same null.

    Raises:
        UsageError: a method selects no neuron at all (e.g. a ratio below one neuron); a
            culture left without neurons is one warning.
    """
    if stats.shard is not None:
        raise UsageError(f"these statistics are shard {stats.shard[0]}/{stats.shard[1]} only; "
                         "add all shards with `merge` first")  # fmt: skip
    masks = {m: select(stats, m, **config.selector_options(m)) for m in config.methods}
    _check_sizes(masks, config)
    if config.rnd_draws:
        for group, names in _size_groups(masks, config):
            like = masks[group[0]]
            draws = select(stats, "rnd", like=like, per_layer=config.per_layer,
                           seed=_rnd_seed(like, config), draws=config.rnd_draws)  # fmt: skip
            masks.update(zip(names, draws, strict=True))
    for m in masks.values():
        m.options["selection"] = config.settings("select")
    if out is not None:
        save_masks(masks, out)
    return masks


def save_masks(masks: dict[str, Masks], out: Path) -> None:
    """Every mask as ``out/masks/<name>.safetensors``."""
    for name, m in masks.items():
        m.save(Path(out) / "masks" / f"{name}.safetensors")


def rnd_draws_of(methods: dict[str, Masks], config: RunConfig) -> dict[str, list[str]]:
    """Method -> the names of its RND draws (``rnd-<methods of those sizes>-<i>``; none when
    ``rnd_draws`` is 0)."""
    return {m: names for group, names in _size_groups(methods, config) for m in group}


def _size_groups(methods: dict[str, Masks], config: RunConfig) -> list[tuple[list[str], list[str]]]:
    """(methods of identical set sizes, their draws' names), in the order of ``methods``."""
    groups: dict[tuple, list[str]] = {}
    for name, m in methods.items():
        groups.setdefault(_sizes_key(m, config.per_layer), []).append(name)
    return [(group, [f"rnd-{'+'.join(group)}-{i}" for i in range(config.rnd_draws)])
            for group in groups.values()]  # fmt: skip


def _sizes_key(masks: Masks, per_layer: bool) -> tuple[int, ...]:
    """What a size-matched RND draw matches: the sets' sizes, or their sizes per layer."""
    return tuple((masks.layer_counts() if per_layer else masks.sizes()).flatten().tolist())


def _rnd_seed(like: Masks, config: RunConfig) -> int:
    return stable_seed("rnd", config.seed, config.per_layer, *_sizes_key(like, config.per_layer))


def _check_sizes(masks: dict[str, Masks], config: RunConfig) -> None:
    """An empty selection is an error (it would measure nothing); an empty set, a warning."""
    for name, m in masks.items():
        sizes = m.sizes()
        if int(sizes.sum()) == 0:
            L, N = m.num_layers, m.num_neurons
            size = N if config.per_layer else L * N
            if name == "lape":
                raise UsageError(f"lape selected no neuron for any culture at --lape-top-rate "
                                 f"{config.lape_top_rate:g} (--lape-bar-ratio "
                                 f"{config.lape_bar_ratio:g}); raise --lape-top-rate, lower "
                                 "--lape-bar-ratio or drop lape from --methods")  # fmt: skip
            if round(size * config.ratio) == 0:
                where = " in each layer" if config.per_layer else ""
                raise UsageError(
                    f"--ratio {config.ratio:g} selects no neuron: round({size} x "
                    f"{config.ratio:g}) = 0 per culture{where} ({L} layers x {N} neurons); "
                    f"pass a --ratio above {0.5 / size:.2g}"
                )
            raise UsageError(f"{name} selected no neuron for any culture at --ratio "
                             f"{config.ratio:g}; raise --ratio or drop {name} from "
                             "--methods")  # fmt: skip
        empty = [m.names[s] for s in range(len(m)) if int(sizes[s]) == 0]
        if empty:
            log.warning("%s selected no neuron for %s: ablating their set changes nothing",
                        name, ", ".join(empty))  # fmt: skip
