"""An independent reference for the statistics, written apart from the package's backends.

It captures each decoder MLP's *input* with a pre-hook on the MLP module, recomputes
``a = act(gate_proj(x))`` itself (same fp32 linear, so the sign of every value is bit-equal
to the model's; the sums are then taken in fp64), and weighs tokens item by item with plain
Python loops over the attention mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from culture_neurons.models import adapters


def act(g: torch.Tensor, act_fn: str) -> torch.Tensor:
    if act_fn == "silu":
        return g * torch.sigmoid(g)
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def capture_mlp_inputs(model, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each decoder MLP's input ``[B, T, H]`` and the model's logits, from one plain forward."""
    mlps = adapters.decoder_mlps(model)
    captured: list[torch.Tensor] = [None] * len(mlps)
    handles = [
        mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
        for i, mlp in enumerate(mlps)
    ]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return captured, logits


def weights_by_hand(inputs: dict, scope: str, image_ids: tuple[int, ...]) -> torch.Tensor:
    """Bool [B, T] written with loops (not the package's tensor logic)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    B, T = ids.shape
    w = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] == 1]
        for t in valid:
            is_image = int(ids[b, t]) in image_ids
            w[b, t] = {"all": True, "text": not is_image, "image": is_image,
                       "last": t == valid[-1]}[scope]  # fmt: skip
    return w


def reference_stats(
    model, inputs: dict, cultures: list[int], num_cultures: int, scope: str = "all",
    activation: str = "gate",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """T [C], K [C, L, N] int64, S/Q [C, L, N] float64 of one batch."""
    act_fn = adapters.activation_fn(model)
    mlps = adapters.decoder_mlps(model)
    xs, _ = capture_mlp_inputs(model, inputs)
    w = weights_by_hand(inputs, scope, adapters.image_token_ids(model))
    L, N = len(mlps), mlps[0].gate_proj.out_features
    T = torch.zeros(num_cultures, dtype=torch.int64)
    K = torch.zeros(num_cultures, L, N, dtype=torch.int64)
    S = torch.zeros(num_cultures, L, N, dtype=torch.float64)
    Q = torch.zeros(num_cultures, L, N, dtype=torch.float64)
    for layer, (mlp, x) in enumerate(zip(mlps, xs, strict=True)):
        with torch.no_grad():
            a = act(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias), act_fn)
            if activation == "post":
                a = a * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        for b, c in enumerate(cultures):
            if c < 0:
                continue
            rows = a[b][w[b]].double()  # [tokens counted, N]
            K[c, layer] += (rows > 0).sum(0)
            S[c, layer] += rows.sum(0)
            Q[c, layer] += (rows**2).sum(0)
            if layer == 0:
                T[c] += int(w[b].sum())
    return {"T": T, "K": K, "S": S, "Q": Q}


def assert_stats_equal(stats, ref: dict, rtol: float = 1e-5) -> None:
    """Counts exactly; sums to ``rtol`` (fp64 sums of the same fp32 values, order differs).
    On failure, names the first mismatching (culture, layer, neuron)."""
    assert torch.equal(stats.T, ref["T"]), f"T {stats.T.tolist()} != {ref['T'].tolist()}"
    bad = (stats.K != ref["K"]).nonzero()
    assert len(bad) == 0, (
        f"{len(bad)} counts differ; first (culture, layer, neuron) = {bad[0].tolist()}: "
        f"{stats.K[tuple(bad[0])]} vs {ref['K'][tuple(bad[0])]}"
    )
    for name in ("S", "Q"):
        got, want = getattr(stats, name), ref[name]
        # atol covers sums that cancel to ~0; scale set by the largest magnitude.
        atol = rtol * float(want.abs().max()) + 1e-12
        close = torch.isclose(got, want, rtol=rtol, atol=atol)
        bad = (~close).nonzero()
        assert len(bad) == 0, (
            f"{name} differs at (culture, layer, neuron) = {bad[0].tolist()}: "
            f"{got[tuple(bad[0])].item()} vs {want[tuple(bad[0])].item()}"
        )
