"""The trained toy VLM: cached atomically and deterministically, accurate, and culture-sensitive.

One build (module fixture, into a temporary cache) serves every test. The selectivity test runs
the paper's protocol at toy scale: statistics on the identification half (correct items only),
CAS sets of RATIO of the L*N neurons, every culture's set ablated on every culture's evaluation
half, against random sets of the same sizes.
"""

import os
import time

import pytest
import torch

from culture_neurons import ablate, record
from culture_neurons.demo.toy import TOY_RATIO, VERSION, default_cache_dir, load_toy, toy
from culture_neurons.errors import UsageError
from culture_neurons.scoring.metrics import self_cross
from culture_neurons.scoring.multiple_choice import Group, predict
from culture_neurons.scoring.prompting import encode
from culture_neurons.selection.methods import select

pytestmark = pytest.mark.slow  # one toy build: ~1-3 minutes on 2 busy CPU cores

RATIO = TOY_RATIO  # 5 % of L*N per culture: large enough for a 3-layer toy, see toy.py
RND_DRAWS = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("toy") / "toy-seed0"
    start = time.perf_counter()
    t = toy(seed=0, cache_dir=cache)
    return t, time.perf_counter() - start


def _accuracy(t, items) -> float:
    preds = predict(t.model, t.processor, items, batch_size=64)
    return float((preds == torch.tensor([it.label for it in items])).float().mean())


def test_second_call_loads_the_cache_with_the_same_weights(built):
    t, _ = built
    start = time.perf_counter()
    again = toy(seed=0, cache_dir=t.cache_dir)
    assert time.perf_counter() - start < 60, "a cached toy must load, not rebuild"
    first, second = t.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    for name, weight in first.items():
        assert torch.equal(weight, second[name]), name
    assert again.description == t.description
    assert again.data.counts() == t.data.counts()
    # The build went through a temporary folder that is gone now.
    leftovers = [p.name for p in t.cache_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_description_and_layout(built):
    t, _ = built
    assert (t.cache_dir / "toy.json").is_file() and t.data_path.is_file()
    assert (t.cache_dir / "model" / "config.json").is_file()
    assert "Qwen2_5_VL" in t.description and "Accuracy" in t.description
    assert t.metadata["seed"] == 0 and len(t.data.cultures) == t.metadata["config"]["cultures"]


def test_full_model_is_far_above_chance_on_unseen_items(built):
    t, _ = built
    acc = _accuracy(t, list(t.data))
    assert acc >= 0.6, f"accuracy {acc:.3f} on data_path (chance 0.25)"
    assert acc == pytest.approx(t.metadata["accuracy"], abs=1e-6)


def _delta_matrix(t, evaluation, masks) -> torch.Tensor:
    """[C, C] accuracy change in points: row s = culture whose set is ablated, column c'."""
    C = len(evaluation.cultures)
    delta = torch.zeros(C, C, dtype=torch.float64)
    with ablate(t.model, masks) as ablator:
        for j, items in enumerate(evaluation.items_by_culture.values()):
            group = Group(t.model, t.processor, items)
            preds = group.predict([-1, *range(C)], ablator)  # [1 + C, B]
            labels = torch.tensor([it.label for it in items])
            acc = 100 * (preds == labels).double().mean(dim=1)
            delta[:, j] = acc[1:] - acc[0]
    return delta


def _stats(t, identification):
    """Statistics of the identification items the full model answers right (SPEC default)."""
    correct = []
    for items in identification.items_by_culture.values():
        preds = predict(t.model, t.processor, list(items), batch_size=64)
        correct.append([it for it, p in zip(items, preds.tolist(), strict=True) if p == it.label])
    with record(t.model, identification.cultures, backend="fused") as rec, torch.no_grad():
        for c, items in enumerate(correct):
            rec(c, **encode(t.model, t.processor, items))
        return rec.stats()


def test_cas_ablation_hurts_the_own_culture_more_than_random_neurons(built):
    t, _ = built
    identification, evaluation = t.data.split(0.5, seed=0)
    stats = _stats(t, identification)
    cas = select(stats, "cas", ratio=RATIO)
    assert int(cas.sizes().min()) > 0
    cas_summary = self_cross(_delta_matrix(t, evaluation, cas))
    rnd_gaps = [
        self_cross(_delta_matrix(t, evaluation, masks))["gap"]
        for masks in select(stats, "rnd", like=cas, seed=0, draws=RND_DRAWS)
    ]
    report = f"cas {cas_summary}, rnd gaps {rnd_gaps}"
    # Measured (seed 0): self -3.1, cross -0.5, RND gaps within +-0.5 of 0 (toy.py docstring).
    assert cas_summary["self"] < cas_summary["cross"] - 1, report  # > 1 point more on its own
    assert cas_summary["gap"] < min(rnd_gaps) - 1, report


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CULTURE_NEURONS_CACHE", str(tmp_path))
    assert default_cache_dir(3) == tmp_path / f"{VERSION}-seed3"
    monkeypatch.delenv("CULTURE_NEURONS_CACHE")
    assert default_cache_dir(0).parent == default_cache_dir(1).parent
    assert str(default_cache_dir(0)).startswith(os.path.expanduser("~"))


def test_loading_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="no built toy"):
        load_toy(tmp_path)


def test_a_cache_of_another_seed_is_refused(built):
    t, _ = built
    with pytest.raises(UsageError, match="seed 0 with config"):
        toy(seed=5, cache_dir=t.cache_dir)
