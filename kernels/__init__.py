"""Kernels of the fused MLP backend, installed as ``culture_neurons.kernels``.

- ``act_and_record``: ``h = act(gate) * up`` with per-culture ``K, S, Q`` and per-row ablation
  (Triton on CUDA, chunked PyTorch elsewhere; op ``culture_neurons::act_and_record``), and
  ``LayerOp``, the same bound to one layer's totals and mask (checked once per attach).
- ``act``: SiLU / GELU-tanh by name (``ACT_FNS``).
- ``dispatch``: which path runs: the Triton kernel, self-checked once per device, dtype and
  variant, or PyTorch; a fallback is loud (``CULTURE_NEURONS_KERNEL=triton`` makes it an error).
- ``reference``: fp64 PyTorch references the tests compare against.

Importing this package never imports triton: the Triton module (``act_record``) loads when a
CUDA tensor first reaches the op. In a source checkout ``culture_neurons/__init__.py`` makes
this folder importable as ``culture_neurons.kernels`` too.
"""

from .ops import ACT_FNS, LayerOp, act, act_and_record

__all__ = ["ACT_FNS", "LayerOp", "act", "act_and_record"]
