"""The eval JSON schema (culture_neurons.eval_schema): every key each task writes is declared,
every summary key round-trips through the schema, and a reader finds the measures (the primary
first) from the file alone. Eval JSONs come from the tasks' own ``results`` on random scores."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from culture_neurons import eval_schema
from culture_neurons.eval_schema import (
    ACCURACY_DELTA,
    FLIP,
    MEASURES,
    NLL_DELTA,
    SUMMARIES,
    TESTED,
    describe,
    measures_of,
    parse,
    primary,
)
from culture_neurons.masks import Masks
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.stats import Fingerprint
from culture_neurons.tasks import TASKS, LMTask, MCTask

FP = Fingerprint("t", "t", 3, 7, 4, "silu", "c" * 64)
C, PER, DRAWS = 3, 9, 3


def _inputs(seed: int, scores):
    """masks, per_set scores, full scores, items, culture, nulls for one method and its draws."""
    gen = torch.Generator().manual_seed(seed)
    cultures = [f"c{i}" for i in range(C)]
    culture = torch.arange(C).repeat_interleave(PER)
    names = ["cas"] + [f"rnd-cas-{i}" for i in range(DRAWS)]
    masks = {n: Masks.from_sets(cultures, [torch.randperm(21, generator=gen)[:2] for _ in range(C)],
                                FP, n.split("-")[0]) for n in names}  # fmt: skip
    per_set = {n: scores((C, C * PER), gen) for n in names}
    items = [SimpleNamespace(id=f"i{j}", label=int(torch.randint(0, 4, (), generator=gen)))
             for j in range(C * PER)]  # fmt: skip
    return masks, per_set, scores((C * PER,), gen), items, culture, cultures, {"cas": names[1:]}


def mc_eval(labels: bool, alpha=None, seed=0) -> dict:
    config = RunConfig(methods=("cas",), rnd_draws=DRAWS, resamples=50,
                       identify_on="correct" if labels else "all",
                       intervention="ablate" if alpha is None else "steer", alpha=alpha)  # fmt: skip
    masks, per_set, full, items, culture, cultures, nulls = _inputs(
        seed, lambda shape, gen: torch.randint(0, 4, shape, generator=gen))
    _, results = MCTask(None, None, config).results(
        masks, per_set, full, items, culture, cultures,
        SimpleNamespace(labels_available=labels), nulls)  # fmt: skip
    return json.loads(json.dumps(results["cas"]))  # as a reader gets it


def lm_eval(seed=0) -> dict:
    config = RunConfig(methods=("cas",), rnd_draws=DRAWS, resamples=50, task="lm")
    task = object.__new__(LMTask)  # no model: the scores are given, the tokens made up
    task.config = config
    tokens = torch.randint(3, 9, (C * PER,), generator=torch.Generator().manual_seed(seed))
    task.tokens = lambda items: tokens
    masks, per_set, full, items, culture, cultures, nulls = _inputs(
        seed, lambda shape, gen: 20 + 5 * torch.rand(shape, generator=gen, dtype=torch.float64))
    _, results = task.results(masks, per_set, full, items, culture, cultures, None, nulls)
    return json.loads(json.dumps(results["cas"]))


CASES = {
    "mc labels": (lambda: mc_eval(True), (ACCURACY_DELTA, FLIP)),
    "mc hidden labels": (lambda: mc_eval(False), (FLIP,)),
    "mc steered": (lambda: mc_eval(True, alpha=0.5), (ACCURACY_DELTA, FLIP)),
    "lm": (lm_eval, (NLL_DELTA,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_key_a_task_writes_is_in_the_schema(case):
    make, expected = CASES[case]
    ev = make()
    assert measures_of(ev) == expected and primary(ev) == expected[0]
    unknown = [k for k in ev if describe(k, ev) is None]
    assert unknown == []
    for m in expected:  # every key a measure owns is written, defined where observed
        assert set(m.keys()) <= set(ev)
        assert ev["direction"][m.summary("gap")] in eval_schema.DIRECTIONS
        assert set(ev["resampled"]) >= {m.summary(s) for s in SUMMARIES}
    assert expected[0].p_adjusted("gap") in ev  # the primary p, Holm-adjusted


@pytest.mark.parametrize("case", list(CASES))
def test_every_summary_key_round_trips(case):
    make, expected = CASES[case]
    ev = make()
    built = []
    for m in expected:
        for s in SUMMARIES:
            kinds = {"value": m.summary(s), "ci": m.ci(s)}
            if s in TESTED:
                kinds["p"] = m.p(s)
                kinds["p_adjusted"] = m.p_adjusted(s)
            for kind, key in kinds.items():
                assert parse(key, ev) == (m, s, kind)
                built.append(key)
    assert len(built) == len(set(built))  # no two measures of a task share a key
    others = {k for m in MEASURES.values() if m not in expected for k in m.keys()} - set(built)
    assert all(parse(k, ev) is None for k in others)


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_without_its_measures_list_is_read_by_its_task(case):
    """Eval JSONs written before ``measures`` existed: the task's own measures."""
    make, expected = CASES[case]
    ev = make()
    del ev["measures"]
    assert measures_of(ev) == expected


def test_the_direction_follows_the_measure_and_alpha():
    assert mc_eval(True)["direction"]["gap"] == ACCURACY_DELTA.harm == "lower"
    assert mc_eval(True)["direction"]["flip_gap"] == FLIP.harm == "higher"
    assert lm_eval()["direction"]["gap"] == NLL_DELTA.harm == "higher"
    steered = mc_eval(True, alpha=0.5)["direction"]
    assert steered["gap"] == "either" and steered["flip_gap"] == "higher"  # flips: any change


def test_every_task_declares_its_measures_from_the_schema():
    for task in TASKS.values():
        for labels in (True, False):
            assert all(MEASURES[m.name] is m for m in task.measures(labels))
