"""The planted ground truth: planted neurons fire as designed, and selectors are judged fairly.

Every check reads the statistics recorded by the fused backend, as the bench does. A small
config keeps the whole file at a few seconds.
"""

import math

import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks
from culture_neurons.testing.planted import PlantConfig, Score, plant, score, select_matched

# 2 layers x 128 neurons, 4 cultures, 4 planted neurons each. culture_share 0.8: a planted
# neuron can fire on at most 80 % of its culture's positions (its words), so "high" is clear.
SMALL = dict(layers=2, intermediate=128, cultures=4, per_culture=4, always_on=4, pairs=4,
             rows_per_culture=8, seq_len=24, culture_share=0.8)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test box has 2 cores shared by several jobs; torch's 2 threads made each forward of
    # the planted model ~8x slower there than 1 thread (oversubscription).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _predicted(strength: float, noise: float, share: float) -> tuple[float, float]:
    """(P on its culture, P on another culture) of a planted neuron (planted.py docstring)."""
    s = strength / math.sqrt(1 + noise**2)
    return share * _phi(s) + (1 - share) * _phi(-s), _phi(-s)


def _own_mask(P: torch.Tensor) -> torch.Tensor:
    """bool like P [C, k, C']: True at [c, j, c] (a neuron's own culture)."""
    C = P.shape[0]
    return torch.eye(C, dtype=torch.bool).unsqueeze(1).expand_as(P)


@pytest.fixture(scope="module")
def strong():
    planted = plant(strength=3.0, **SMALL)
    return planted, planted.record(backend="fused")


def test_planted_neurons_fire_for_their_culture_and_not_for_others(strong):
    planted, stats = strong
    P = planted.truth.probabilities(stats)  # [C, k, C']
    own = _own_mask(P)
    # Bounds from _predicted(3, 0, 0.8) = (0.80, 0.001), with room for the token sample.
    for c, j, culture in torch.nonzero(P >= 0).tolist():
        neuron, p = int(planted.truth.planted[c][j]), float(P[c, j, culture])
        if own[c, j, culture]:
            assert p > 0.6, f"neuron {neuron} planted for culture {c} fires too rarely: P = {p:.3f}"
        else:
            assert p < 0.05, f"neuron {neuron} planted for culture {c} fires on {culture}: {p:.3f}"


def test_fused_counts_equal_hooks_counts(strong):
    # The bench reads fused statistics; on the planted model they must be the reference's.
    planted, stats = strong
    reference = planted.record(backend="hooks")
    assert torch.equal(stats.T, reference.T)
    bad = torch.nonzero(stats.K != reference.K)
    assert bad.numel() == 0, f"K differs at (culture, layer, neuron) {bad[0].tolist()}"


def test_truth_layout(strong):
    planted, stats = strong
    truth, config = planted.truth, planted.config
    triples = truth.triples()
    assert triples.shape == (config.cultures * config.per_culture, 3)
    dense = truth.dense()
    assert dense.shape == stats.shape and int(dense.sum()) == triples.shape[0]
    assert bool(dense[triples[:, 2], triples[:, 0], triples[:, 1]].all())
    every = torch.cat([*truth.planted, truth.always_on, truth.pairs])
    assert every.unique().numel() == every.numel(), "planted and distractor neurons overlap"


@pytest.mark.parametrize("strength, noise", [(2.0, 0.0), (2.0, 3.0), (1.0, 0.0)])
def test_firing_rates_follow_strength_and_noise(strength, noise):
    # Strength and noise are in units of the random pre-activation std, so P follows the
    # normal CDF of strength / sqrt(1 + noise^2). 0.06: the token sample is ~100 words per
    # culture and the per-token spread is only roughly Gaussian (measured error <= 0.035).
    planted = plant(strength=strength, noise=noise, **SMALL)
    P = planted.truth.probabilities(planted.record())
    own = _own_mask(P)
    want_own, want_other = _predicted(strength, noise, SMALL["culture_share"])
    assert float(P[own].mean()) == pytest.approx(want_own, abs=0.06)
    assert float(P[~own].mean()) == pytest.approx(want_other, abs=0.06)


def test_always_on_distractors_fire_for_every_culture(strong):
    planted, stats = strong
    P = planted.truth.probabilities(stats, planted.truth.always_on)  # [n, C']
    assert bool((P > 0.95).all()), f"always-on P: {P}"


def test_pair_distractors_fire_for_their_two_cultures(strong):
    planted, stats = strong
    P = planted.truth.probabilities(stats, planted.truth.pairs)  # [n, C']
    on = torch.zeros_like(P, dtype=torch.bool)
    on.scatter_(1, planted.truth.pair_cultures, True)
    assert bool((P[on] > 0.6).all()) and bool((P[~on] < 0.05).all()), f"pair P: {P}"


def test_same_seed_same_model_and_data_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = plant(seed=3, **SMALL), plant(seed=3, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), state), "plant() moved the global RNG"
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert all(
        torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.batches, b.batches, strict=True)
    )
    c = plant(seed=4, **SMALL)
    assert not torch.equal(c.truth.planted[0], a.truth.planted[0])


def test_data_rows_carry_their_culture_words_only():
    planted = plant(**SMALL)
    group = planted.token_group
    for batch in planted.batches:
        g = group[batch.input_ids]  # [B, T]
        valid = batch.attention_mask.bool()
        assert bool((g[~valid] == -1).all()), "padding must be id 0 (group -1)"
        words = (g >= 0) & (g < SMALL["cultures"])  # culture words, not shared ones
        assert bool((g[words] == batch.culture.view(-1, 1).expand_as(g)[words]).all())


def test_strong_planting_cas_recovers_rnd_at_chance_lap_takes_always_on(strong):
    planted, stats = strong
    truth = planted.truth
    cas = score(select_matched(stats, truth, "cas"), truth)
    assert cas.recall >= 0.9 and cas.precision >= 0.9, cas
    rnd = score(select_matched(stats, truth, "rnd", draws=50), truth)
    chance = SMALL["per_culture"] / (SMALL["layers"] * SMALL["intermediate"])
    assert rnd.precision < 5 * chance, (rnd, chance)
    # always-on neurons (P ~ 1) outrank planted ones (P <= culture_share) for LAP.
    lap = score(select_matched(stats, truth, "lap"), truth)
    assert lap.always_on >= lap.selected // 2 and lap.recall < 0.5, lap


def test_nothing_planted_nothing_recovered():
    # strength 0: the "planted" rows are ordinary random neurons, CAS must not find them.
    planted = plant(strength=0.0, **SMALL)
    stats = planted.record()
    cas = score(select_matched(stats, planted.truth, "cas"), planted.truth)
    assert cas.recall < 0.3, cas


def test_select_matched_sizes(strong):
    planted, stats = strong
    truth, k, C = planted.truth, SMALL["per_culture"], SMALL["cultures"]
    for method in ("cas", "lap", "mad"):
        assert select_matched(stats, truth, method).sizes().tolist() == [k] * C, method
    assert select_matched(stats, truth, "lape").options["kept"] <= C * k
    draws = select_matched(stats, truth, "rnd", draws=3)
    assert len(draws) == 3 and all(d.sizes().tolist() == [k] * C for d in draws)


def test_score_counts_exactly(strong):
    planted, stats = strong
    truth = planted.truth
    # Culture 0: two of its planted neurons, one always-on; culture 1: culture 0's neuron (a
    # miss, it is not planted for 1); the rest empty.
    sets = [
        torch.cat([truth.planted[0][:2], truth.always_on[:1]]),
        truth.planted[0][2:3],
        *[torch.zeros(0, dtype=torch.int64)] * (SMALL["cultures"] - 2),
    ]
    masks = Masks.from_sets(planted.cultures, sets, stats.fingerprint)
    got = score(masks, truth)
    planted_total = SMALL["cultures"] * SMALL["per_culture"]
    assert got == Score(tp=2, selected=4, planted=planted_total, always_on=1, pairs=0)
    assert got.precision == 0.5 and got.recall == 2 / planted_total
    assert score([masks, masks], truth).tp == 4
    empty = Masks.from_sets(planted.cultures, [torch.zeros(0, dtype=torch.int64)] * 4,
                            stats.fingerprint)  # fmt: skip
    assert math.isnan(score(empty, truth).precision)


@pytest.mark.parametrize(
    "bad",
    [dict(cultures=1), dict(per_culture=1000), dict(culture_share=1.5), dict(noise=-1.0),
     dict(cultures=70), dict(bias_signal=0.0)],
)  # fmt: skip
def test_bad_configs_are_refused(bad):
    with pytest.raises(UsageError):
        PlantConfig(**bad)
