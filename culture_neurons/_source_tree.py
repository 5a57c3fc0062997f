"""``culture_neurons.kernels`` from a source checkout.

The Triton kernels live in ``kernels/`` at the repository root (SPEC: never a top-level
``kernels`` package, a name another library that transformers imports already takes);
``setup.py`` installs that folder as ``culture_neurons.kernels``. Run from a checkout
(``python -m culture_neurons``, ``torchrun -m culture_neurons``, ``python -m pytest`` in the
repository root), Python finds this source package first, which has no ``kernels`` inside: a
finder then maps exactly that one name to the root folder. Installed copies never need it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

NAME = "culture_neurons.kernels"
_ROOT_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``culture_neurons.kernels`` (and its modules) in the checkout's ``kernels/``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == NAME:
            return importlib.util.spec_from_file_location(
                NAME, _ROOT_KERNELS / "__init__.py", submodule_search_locations=[str(_ROOT_KERNELS)]
            )
        return None  # submodules are found through the package's __path__ set above


def find_kernels() -> None:
    """Install the finder when this package is a checkout without ``culture_neurons/kernels``."""
    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or not (_ROOT_KERNELS / "__init__.py").is_file():
        return  # installed (kernels copied in), or not a checkout
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        # First: it answers for one name only, and only for this checkout, so it must win over
        # an editable install of another checkout (whose finder would map the name there).
        sys.meta_path.insert(0, _KernelsFinder())
