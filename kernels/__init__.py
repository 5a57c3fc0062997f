"""Kernels of the fused MLP backend, installed as ``culture_neurons.kernels``.

- ``act_and_record``: ``h = act(gate) * up`` with per-culture ``K, S, Q`` and per-row ablation
  (Triton on CUDA, chunked PyTorch elsewhere; op ``culture_neurons::act_and_record``).
- ``masked_down_proj``: ``(h * keep[row_set]) @ W^T`` (op ``culture_neurons::masked_down_proj``).
- ``activation``: SiLU / GELU-tanh by name (``ACT_FNS``).
- ``reference``: fp64 PyTorch references the tests compare against.

Importing this package never imports triton: the Triton modules (``act_record``,
``masked_down``) load when a CUDA tensor first reaches an op.
"""

from .ops import ACT_FNS, RECORDS, act_and_record, activation, masked_down_proj

__all__ = ["ACT_FNS", "RECORDS", "act_and_record", "activation", "masked_down_proj"]
