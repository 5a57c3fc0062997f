"""The default run on the toy and its headline numbers, recorded beside the shipped toy.

``headline.json`` (written by ``python -m culture_neurons.demo.build``) keeps the full-model
accuracy and each method's primary measure (the accuracy gap, self and cross) of the run that
``culture-neurons run`` makes on the shipped toy; ``tests/demo/test_toy.py`` reruns it and
holds the numbers to within one evaluation item per culture, so a change that moves them is
seen. Its p-values, set sizes and counts of harmed cells are kept for the reader
(RESULTS.md), not asserted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from culture_neurons.demo.shipped import SHIPPED

HEADLINE = SHIPPED / "headline.json"
METHOD_KEYS = ("gap", "self", "cross")  # accuracy change, points: the primary measure
NOTED_KEYS = ("gap_ci", "p_gap_vs_rnd", "p_gap_vs_rnd_adj", "p_flip_gap_vs_rnd", "specificity",
              "set_sizes")  # p_gap_vs_rnd_adj: the run's primary test, Holm across methods


def default_run(t, out: str | Path) -> dict[str, dict]:
    """Run the pipeline on toy ``t`` as ``culture-neurons run`` does (its toy defaults)."""
    from culture_neurons.demo.toy import TOY_BATCH_SIZE, TOY_RATIO, TOY_THREADS
    from culture_neurons.pipeline.config import RunConfig
    from culture_neurons.pipeline.run import Run

    threads = torch.get_num_threads()
    torch.set_num_threads(TOY_THREADS)
    try:
        config = RunConfig(ratio=TOY_RATIO, batch_size=TOY_BATCH_SIZE)
        return Run(t.model, t.processor, t.data, Path(out), config, progress=False).run()
    finally:
        torch.set_num_threads(threads)


def headline(results: dict[str, dict]) -> dict:
    """The numbers to record: full-model accuracy (percent, mean of cultures) and each
    method's gap/self/cross (points), with ``tolerance_points`` = one evaluation item of the
    smallest culture."""
    first = next(iter(results.values()))
    return {
        "accuracy_full_mean": first["accuracy_full_mean"],
        "tolerance_points": 100 / min(first["items_per_culture"]),
        "methods": {
            m: {**{k: r[k] for k in METHOD_KEYS + NOTED_KEYS}, **harmed_cells(r["delta_ci"])}
            for m, r in sorted(results.items())
        },
    }


def harmed_cells(delta_ci: list) -> dict[str, int]:
    """How many own-culture cells (the diagonal) and cross cells of a method's accuracy-change
    matrix have an interval entirely below 0."""
    below = [[hi < 0 for _, hi in row] for row in delta_ci]
    own = sum(below[i][i] for i in range(len(below)))
    return {"own_cells_harmed": own, "cross_cells_harmed": sum(map(sum, below)) - own}

