"""Kernels of the fused MLP backend (``culture_neurons.kernels``).

- ``act_and_record``: ``h = act(gate) * up`` with per-culture ``K, S, Q`` and per-row ablation
  (Triton on CUDA, chunked PyTorch elsewhere; op ``culture_neurons::act_and_record``), and
  ``LayerOp``, the same bound to one layer's totals and mask (checked once per attach).
- ``act``: SiLU / GELU-tanh by name (``ACT_FNS``).
- ``dispatch``: which path runs: the Triton kernel, self-checked once per device, dtype and
  variant, or PyTorch; a fallback is loud (``CULTURE_NEURONS_KERNEL=triton`` makes it an error).
- ``check``: the self-check, its tolerances and ``first_mismatch`` (the tests and
  ``bench/gpu_check.py`` compare with them too).
- ``reference``: fp64 PyTorch references the tests compare against.
- the parts of the op, one concern each: ``args`` (``OpArgs``, the checks), ``torch_path`` and
  ``reduce`` (the PyTorch path and the reduction every non-Triton path shares), ``act_record``
  (Triton), ``custom_op`` (``culture_neurons::act_and_record``).

The modules import nothing from ``culture_neurons`` but ``culture_neurons.errors``: the
instrument and the statistics import from here, never the reverse.

Importing this package never imports triton: the Triton module (``act_record``) loads when a
CUDA tensor first reaches the op.

Where the modules live: in the repository's top-level ``kernels/`` folder (the layout of the
SPEC). That folder has no ``__init__.py`` on purpose: ``kernels`` is also the name of Hugging
Face's kernel hub package, which transformers >= 5.25 imports, and wherever the repository root
comes first on ``sys.path`` (``python -m``, ``torchrun -m``, ``python -m pytest`` from the root)
a regular package there would shadow it (``cannot import name 'CUDAProperties' from
'kernels'``). A folder without ``__init__.py`` loses to any regular package later on the path.
This file is the package's only ``__init__``: installed, ``setup.py`` copies the folder's
modules beside it; in a checkout, the folder is added to ``__path__`` below.
"""

from pathlib import Path

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if not (Path(__file__).with_name("ops.py")).is_file() and (_CHECKOUT_KERNELS / "ops.py").is_file():
    __path__.append(str(_CHECKOUT_KERNELS))  # noqa: F821 (a package's own __path__)

from .ops import ACT_FNS, LayerOp, act, act_and_record  # noqa: E402

__all__ = ["ACT_FNS", "LayerOp", "act", "act_and_record"]
