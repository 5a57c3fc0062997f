"""Planted ground truth: tiny causal LMs whose culture-selective neurons are known.

A selector can only be judged against a truth. This module builds one: a random
``LlamaForCausalLM`` (L layers, hidden H, N neurons per layer) plus a token dataset of C
cultures, in which chosen MLP neurons are edited to fire for one culture's tokens and not for
the others'. The truth is the set of (layer, neuron, culture) triples that were planted.

Symbols: C cultures, L layers, N neurons per layer (intermediate size), H hidden size,
V vocabulary, B rows per batch, T positions per row. Neurons are named by their flat index
``l * N + n`` as in :class:`~culture_neurons.masks.Masks`.

Vocabulary. Id 0 is padding; then ``shared_tokens`` ids used by every culture, then
``tokens_per_culture`` ids per culture (its "words"). A row of culture c holds, at each
position, one of c's words with probability ``culture_share`` and a shared word otherwise.

Embeddings are built from orthonormal directions so that a neuron's input is predictable:

    e(token) = b * u_bias + a * u_group(token) + z(token)

``u_bias`` is common to every token (Llama's gate_proj has no bias; this direction stands in
for one), ``u_group`` is the token's culture direction (or the shared one), ``z`` is a random
vector orthogonal to all of them. With ``a = culture_signal * |z|``, ordinary random neurons are
only weakly culture-dependent. At random init (std 0.02) attention and MLP outputs are small
next to these embeddings, so every decoder MLP's input (after RMSNorm) is the token's embedding,
rescaled, plus a little context (measured cosine >= 0.997 in all 4 layers of the default
config, planted model included): planted neurons work in any layer.

Planting (per layer, calibrated on that layer's actual MLP inputs ``x``, in layer order so that
earlier plants are seen by later layers). With ``sigma`` the standard deviation of the random
gate pre-activations ``W_gate x`` of that layer, a planted row of culture c becomes

    w = w_random + strength * sigma * d_c + noise * sigma_w * g,     g ~ N(0, I_H)

where ``d_c`` (a combination of ``u_c`` and ``u_bias``) is scaled so that ``d_c . x`` is about
+1 on c's words and -1 on every other token, and ``sigma_w`` is the entry std of the random
rows (so the noise term, like the others, has pre-activation std ``noise * sigma``). The
pre-activation of a planted neuron is thus ``sigma * (xi + strength * (+-1) + noise * xi')``
with ``xi, xi'`` ~ unit random per token: it fires on a share ``Phi(strength / sqrt(1 +
noise^2))`` of its culture's words and ``Phi(-strength / sqrt(1 + noise^2))`` of any other
token, where Phi is the normal CDF. On culture c's rows that gives

    P[c] ~ culture_share * Phi(s') + (1 - culture_share) * Phi(-s'),  P[c'] ~ Phi(-s').

Distractors, at ``distractor_strength`` and without noise:
- always-on neurons: ``d = u_bias`` scaled to +1 on every token; they fire for every culture,
  P ~ 1 everywhere (what a probability-only ranking is drawn to);
- two-culture neurons: ``d`` fires on the words of cultures (i, i + 1 mod C).

    planted = plant(PlantConfig(strength=2.0, noise=0.0))
    stats = planted.record()                       # Stats [C, L, N], fused backend
    truth = planted.truth.planted                  # per culture: flat indices of its neurons
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from culture_neurons.errors import UsageError
from culture_neurons.instrument.instrument import record
from culture_neurons.models import adapters
from culture_neurons.stats import Stats
from culture_neurons.testing.truth import Score, Truth, score, select_matched

__all__ = ["Batch", "PlantConfig", "Planted", "Score", "Truth", "plant", "score", "select_matched"]

PAD_ID = 0
# Multiple to which the vocabulary is padded, as real checkpoints pad their embeddings; the
# padding ids are never emitted.
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class PlantConfig:
    """Every knob of one planted experiment; equal configs give identical models and data."""

    # -- model (the real Llama-2-7B size beside each shrunk value) --
    layers: int = 4  # L; real 32
    hidden: int = 64  # H; real 4096
    intermediate: int = 256  # N; real 11008
    heads: int = 4  # real 32
    # -- vocabulary and data --
    cultures: int = 6  # C
    shared_tokens: int = 200
    tokens_per_culture: int = 40
    culture_share: float = 0.5  # share of a row's positions that carry its culture's words
    culture_signal: float = 0.25  # a / |z|: how culture-dependent ordinary neurons are
    bias_signal: float = 0.5  # b / |z| > 0: stands in for a gate bias; spreads ordinary P
    rows_per_culture: int = 16
    seq_len: int = 32  # T; rows are right-padded to it, each row 3/4 T .. T tokens long
    batch_size: int = 16  # B; rows of all cultures are shuffled together
    # -- planting --
    per_culture: int = 8  # planted neurons per culture
    strength: float = 2.0  # planted signal in units of the random pre-activation std
    noise: float = 0.0  # Gaussian on the planted rows, same units (dilution: culture_share)
    always_on: int = 8  # distractors firing on every token
    pairs: int = 6  # distractors firing on two cultures' words
    distractor_strength: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cultures < 2:
            raise UsageError(f"a planted experiment needs at least 2 cultures, got {self.cultures}")
        if self.cultures + 2 > self.hidden:
            raise UsageError(
                f"hidden={self.hidden} cannot hold {self.cultures} culture directions plus the "
                "shared and bias ones; raise hidden or lower cultures"
            )
        special = self.cultures * self.per_culture + self.always_on + self.pairs
        if special > self.layers * self.intermediate:
            raise UsageError(
                f"{special} planted and distractor neurons do not fit in L * N = "
                f"{self.layers * self.intermediate}; lower per_culture, always_on or pairs"
            )
        if not 0 < self.bias_signal:
            # The bias direction is how a planted neuron gets its threshold (gate_proj has no
            # bias): without it the threshold divides by ~0 and planting silently fails.
            raise UsageError(
                f"bias_signal must be > 0 (it stands in for a gate bias), got {self.bias_signal}; "
                "use a small value such as 0.1 for a narrow spread of ordinary neurons' P"
            )
        if not 0 <= self.culture_share <= 1:
            raise UsageError(f"culture_share must be in [0, 1], got {self.culture_share}")
        if self.strength < 0 or self.noise < 0:
            raise UsageError(
                f"strength and noise must be >= 0, got {self.strength} and {self.noise}"
            )

    @property
    def culture_names(self) -> list[str]:
        return [f"culture{c}" for c in range(self.cultures)]

    @property
    def vocab_size(self) -> int:
        used = 1 + self.shared_tokens + self.cultures * self.tokens_per_culture
        return -(-used // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass
class Batch:
    """One forward's worth of rows: ``input_ids``, ``attention_mask`` int64 [B, T];
    ``culture`` int64 [B], the culture id of each row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    culture: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        """What ``model(**...)`` and ``Instrument(culture, **...)`` take."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class Planted:
    """A planted experiment: the edited model, its data and the truth (see module docstring).

    ``token_group`` int64 [V]: the culture of each token id, ``C`` for shared words, -1 for
    padding and unused ids.
    """

    config: PlantConfig
    model: LlamaForCausalLM
    batches: list[Batch]
    truth: Truth
    token_group: torch.Tensor
    calibration: list[dict] = field(default_factory=list)  # per layer: sigma, gaps (for reports)

    @property
    def cultures(self) -> list[str]:
        return self.config.culture_names

    def record(self, backend: str = "fused", activation: str = "gate") -> Stats:
        """Per-culture statistics of every neuron over all batches (scope ``all``)."""
        with record(self.model, self.cultures, backend=backend, activation=activation) as rec:
            with torch.inference_mode():
                for batch in self.batches:
                    rec(batch.culture, **batch.inputs())
            return rec.stats()  # inside the block: a detached Instrument cannot flush


# -- building -----------------------------------------------------------------------------------
def plant(config: PlantConfig | None = None, **overrides) -> Planted:
    """Build a model and data with culture neurons planted as ``config`` says.

    ``plant(strength=1.0)`` is ``plant(PlantConfig(strength=1.0))``; deterministic in the seed.
    Returns the model in eval mode, fp32, eager attention (exact, reproducible numbers).
    """
    config = PlantConfig(**overrides) if config is None else replace(config, **overrides)
    gen = torch.Generator().manual_seed(config.seed)
    token_group = _token_groups(config)
    model = _random_model(config)
    directions = _embed(model, config, token_group, gen)
    batches = _make_batches(config, token_group, gen)
    truth = _choose_neurons(config, gen)
    calibration = _plant_rows(model, config, batches, token_group, directions, truth, gen)
    return Planted(config, model, batches, truth, token_group, calibration)


def _token_groups(config: PlantConfig) -> torch.Tensor:
    """int64 [V]: culture id of each token, C for shared words, -1 for pad and unused ids."""
    group = torch.full((config.vocab_size,), -1, dtype=torch.int64)
    start = 1
    group[start : start + config.shared_tokens] = config.cultures
    start += config.shared_tokens
    for c in range(config.cultures):
        group[start : start + config.tokens_per_culture] = c
        start += config.tokens_per_culture
    return group


def _random_model(config: PlantConfig) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=max(64, config.seq_len),
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM._from_config(
            llama, attn_implementation="eager", dtype=torch.float32
        )
    return model.eval()


@dataclass
class _Directions:
    """Orthonormal embedding directions, each float32 [H]; ``culture`` is [C, H]."""

    bias: torch.Tensor
    shared: torch.Tensor
    culture: torch.Tensor


def _embed(
    model: LlamaForCausalLM, config: PlantConfig, token_group: torch.Tensor, gen: torch.Generator
) -> _Directions:
    """Overwrite the input embeddings with ``b * u_bias + a * u_group + z`` (module docstring)."""
    H, C, V = config.hidden, config.cultures, config.vocab_size
    basis, _ = torch.linalg.qr(torch.randn(H, C + 2, generator=gen))  # [H, C + 2], orthonormal
    dirs = _Directions(bias=basis[:, 0], shared=basis[:, 1], culture=basis[:, 2:].T)
    z = torch.randn(V, H, generator=gen)
    z -= (z @ basis) @ basis.T  # orthogonal to every named direction, so they stay exact
    z_norm = math.sqrt(H - C - 2)  # expected |z|
    group_dir = torch.cat([dirs.culture, dirs.shared.view(1, H)])  # [C + 1, H], index C = shared
    used = token_group >= 0
    emb = torch.zeros(V, H)
    emb[used] = (
        config.bias_signal * z_norm * dirs.bias
        + config.culture_signal * z_norm * group_dir[token_group[used]]
        + z[used]
    )
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(emb)
    return dirs


def _make_batches(
    config: PlantConfig, token_group: torch.Tensor, gen: torch.Generator
) -> list[Batch]:
    """Rows of every culture, shuffled together, in batches of ``batch_size``."""
    C, T = config.cultures, config.seq_len
    shared_ids = torch.nonzero(token_group == C).squeeze(1)
    rows, cultures, masks = [], [], []
    for c in range(C):
        own_ids = torch.nonzero(token_group == c).squeeze(1)
        for _ in range(config.rows_per_culture):
            own = torch.rand(T, generator=gen) < config.culture_share
            ids = torch.where(
                own,
                own_ids[torch.randint(len(own_ids), (T,), generator=gen)],
                shared_ids[torch.randint(len(shared_ids), (T,), generator=gen)],
            )
            length = int(torch.randint(3 * T // 4, T + 1, (1,), generator=gen))
            mask = torch.arange(T) < length
            rows.append(torch.where(mask, ids, PAD_ID))
            masks.append(mask.long())
            cultures.append(c)
    order = torch.randperm(len(rows), generator=gen)
    input_ids, attention = torch.stack(rows)[order], torch.stack(masks)[order]
    culture = torch.tensor(cultures, dtype=torch.int64)[order]
    B = config.batch_size
    return [
        Batch(input_ids[i : i + B], attention[i : i + B], culture[i : i + B])
        for i in range(0, len(rows), B)
    ]


def _choose_neurons(config: PlantConfig, gen: torch.Generator) -> Truth:
    """Distinct random flat positions for the planted neurons and the distractors."""
    C, k, L, N = config.cultures, config.per_culture, config.layers, config.intermediate
    perm = torch.randperm(L * N, generator=gen)
    planted = [perm[c * k : (c + 1) * k].sort().values for c in range(C)]
    start = C * k
    always_on = perm[start : start + config.always_on].sort().values
    start += config.always_on
    pairs = perm[start : start + config.pairs]  # not sorted: row i goes with pair_cultures[i]
    first = torch.arange(config.pairs) % C
    pair_cultures = torch.stack([first, (first + 1) % C], dim=1)
    return Truth(planted, always_on, pairs, pair_cultures, L, N)


# -- planting ----------------------------------------------------------------------------------
def _mlp_inputs(model: LlamaForCausalLM, layer: int, batches: list[Batch]) -> torch.Tensor:
    """Inputs of decoder layer ``layer``'s MLP at every non-pad position, float32 [R, H]."""
    mlp = adapters.decoder_mlps(model)[layer]
    seen = []
    hook = mlp.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        with torch.inference_mode():
            for batch in batches:
                model.model(**batch.inputs())  # the decoder only: no logits needed
    finally:
        hook.remove()
    valid = torch.cat([b.attention_mask.bool().reshape(-1) for b in batches])
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])[valid]


def _unit_contrast(
    x: torch.Tensor, direction: torch.Tensor, bias: torch.Tensor, on: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """A weight vector ``d`` [H] with ``d . x`` ~ +1 where ``on`` and ~ -1 elsewhere.

    ``x`` [R, H] are MLP inputs, ``on`` bool [R]. The threshold halfway between the two groups'
    mean projections onto ``direction`` is moved onto ``bias`` (whose projection is nearly the
    same for every token), since gate_proj has no bias term. Returns (d, half gap in x units).
    """
    p, p_bias = x @ direction, (x @ bias).mean()
    high, low = p[on].mean(), p[~on].mean()
    centre, half_gap = (high + low) / 2, (high - low) / 2
    d = (direction - (centre / p_bias) * bias) / half_gap
    return d, float(half_gap)


def _plant_rows(
    model: LlamaForCausalLM,
    config: PlantConfig,
    batches: list[Batch],
    token_group: torch.Tensor,
    dirs: _Directions,
    truth: Truth,
    gen: torch.Generator,
) -> list[dict]:
    """Edit gate_proj rows layer by layer (module docstring); returns the calibration per layer.

    Each layer is calibrated on its own MLP inputs after the earlier layers were edited, so
    whatever the earlier plants add to the residual stream is seen.
    """
    valid = torch.cat([b.attention_mask.bool().reshape(-1) for b in batches])
    groups = torch.cat([token_group[b.input_ids].reshape(-1) for b in batches])[valid]  # [R]
    calibration = []
    for layer, mlp in enumerate(adapters.decoder_mlps(model)):
        x = _mlp_inputs(model, layer, batches)  # [R, H], after this layer's RMSNorm
        W = adapters.gate_weight(mlp).detach()  # [N, H]
        sigma = float((x @ W.T).std())  # random pre-activation scale of this layer
        sigma_w = float(W.std())
        plan, gaps = _layer_plan(config, layer, truth, x, groups, dirs)
        with torch.no_grad():
            for n, (d, strength, noise) in plan.items():
                g = torch.randn(config.hidden, generator=gen)
                W[n] += strength * sigma * d + noise * sigma_w * g
        calibration.append({"layer": layer, "sigma": sigma, "half_gap": gaps})
    return calibration


def _layer_plan(
    config: PlantConfig,
    layer: int,
    truth: Truth,
    x: torch.Tensor,
    groups: torch.Tensor,
    dirs: _Directions,
) -> tuple[dict[int, tuple[torch.Tensor, float, float]], list[float]]:
    """For the planted and distractor neurons of ``layer``: neuron -> (unit direction d [H],
    strength, noise), and each culture's calibrated half gap (for reports)."""
    N = config.intermediate
    plan: dict[int, tuple[torch.Tensor, float, float]] = {}

    def here(flat: torch.Tensor) -> list[int]:
        return (flat[flat // N == layer] % N).tolist()

    gaps = []
    for c, flat in enumerate(truth.planted):
        d, gap = _unit_contrast(x, dirs.culture[c], dirs.bias, groups == c)
        gaps.append(gap)
        plan.update({n: (d, config.strength, config.noise) for n in here(flat)})
    always = dirs.bias / (x @ dirs.bias).mean()  # +1 on every token: no threshold needed
    plan.update({n: (always, config.distractor_strength, 0.0) for n in here(truth.always_on)})
    for flat, (c1, c2) in zip(truth.pairs, truth.pair_cultures.tolist(), strict=True):
        on = (groups == c1) | (groups == c2)
        d, _ = _unit_contrast(x, dirs.culture[c1] + dirs.culture[c2], dirs.bias, on)
        plan.update({n: (d, config.distractor_strength, 0.0) for n in here(flat.view(1))})
    return plan, gaps
