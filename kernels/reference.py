"""Plain PyTorch references for the kernels, in fp64, written for clarity (no chunking, no speed).

Symbols: R rows (flattened tokens), N neurons (intermediate size), C cultures, num_sets
ablation sets. Every kernel in this package is tested against these functions; they share no
code with the paths they check (row loops, fp64, no chunking).

- ``act_reference``: ``act(g)`` for ``"silu"`` and ``"gelu_tanh"``.
- ``keep_rows_reference``: the per-row keep mask ``keep[set_ids[r]]`` (all ones for -1).
- ``act_and_record_reference``: ``h``, ``K``, ``S``, ``Q`` of one MLP call (see ``act_record``).
"""

from __future__ import annotations

import math

import torch

from .args import ACT_FNS, ACTIVATIONS


def act_reference(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    """``act(g)`` in fp64: SiLU ``g * sigmoid(g)`` or GELU-tanh (torch ``approximate="tanh"``)."""
    g = g.double()
    if act_fn == "silu":
        return g * torch.sigmoid(g)
    if act_fn == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    raise ValueError(f"act_fn must be one of {ACT_FNS}, got {act_fn!r}")


def keep_rows_reference(
    keep: torch.Tensor | None, set_ids: torch.Tensor | None, R: int, N: int, factor: float = 0.0
) -> torch.Tensor:
    """Per-row multiplier ``[R, N]`` in fp64: 1 where ``keep[set_ids[r]]`` is nonzero or
    set_ids = -1, ``factor`` where the row's set selects the neuron (0: ablation)."""
    mask = torch.ones(R, N, dtype=torch.float64, device="cpu")
    if keep is None or set_ids is None:
        return mask
    for r in range(R):
        s = int(set_ids[r])
        if s >= 0:
            mask[r] = torch.where(keep[s].cpu() != 0, 1.0, factor).double()
    return mask


def act_and_record_reference(
    gate: torch.Tensor,  # [R, N]
    up: torch.Tensor,  # [R, N]
    culture: torch.Tensor,  # [R] int, -1 = row not counted
    num_cultures: int,  # C
    act_fn: str = "silu",
    activation: str = "gate",
    keep: torch.Tensor | None = None,  # [num_sets, N], nonzero = keep, 0 = ablate
    set_ids: torch.Tensor | None = None,  # [R] int, -1 = no ablation
    factor: float = 0.0,  # selected neurons' act times factor: 0 ablates, 1 + alpha steers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``h [R, N]`` (fp64) and the increments ``K [C, N]`` (int64), ``S``, ``Q`` (fp64).

    h = act(g) * u * keep;   a = act(g) * keep (activation="gate") or h (activation="post");
    K[c] = sum_{r: culture[r] == c} [a[r] > 0];  S[c] = sum a[r];  Q[c] = sum a[r]^2.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    R, N = gate.shape
    mask = keep_rows_reference(keep, set_ids, R, N, factor)
    act = act_reference(gate.cpu(), act_fn) * mask
    h = act * up.cpu().double()
    a = act if activation == "gate" else h
    K = torch.zeros(num_cultures, N, dtype=torch.int64)
    S = torch.zeros(num_cultures, N, dtype=torch.float64)
    Q = torch.zeros(num_cultures, N, dtype=torch.float64)
    for r in range(R):
        c = int(culture[r])
        if c < 0:
            continue
        K[c] += (a[r] > 0).long()
        S[c] += a[r]
        Q[c] += a[r] ** 2
    return h, K, S, Q
