"""The package runs from a source checkout as installed: ``python -m culture_neurons``,
``torchrun -m culture_neurons`` and ``python -m pytest`` in the repository root import the
source tree, whose kernel modules sit in the root's ``kernels/`` (culture_neurons/kernels/
__init__.py), and that folder never shadows Hugging Face's ``kernels`` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_cli_assets

REPO = Path(__file__).resolve().parents[1]


def in_repo_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command with the repository root as cwd and no PYTHONPATH: what a user gets."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_kernels_import_from_the_source_tree():
    code = ("import json, culture_neurons, culture_neurons.kernels as k; "
            "print(json.dumps([culture_neurons.__file__, k.__file__, k.ops.__file__]))")  # fmt: skip
    proc = in_repo_root(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    package, kernels, ops = json.loads(proc.stdout)
    assert Path(package).resolve() == REPO / "culture_neurons" / "__init__.py"
    assert Path(kernels).resolve() == REPO / "culture_neurons" / "kernels" / "__init__.py"
    assert Path(ops).resolve() == REPO / "kernels" / "ops.py"


def test_the_root_kernels_folder_never_shadows_a_top_level_kernels():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` when ``modeling_utils`` loads; a
    regular package in the root's ``kernels/`` would win from the root (issue #21)."""
    assert not (REPO / "kernels" / "__init__.py").exists(), "the root kernels/ must stay a plain folder"
    code = ("import importlib.util, json, transformers.modeling_utils; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(json.dumps(spec and spec.origin))")  # fmt: skip
    proc = in_repo_root(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = json.loads(proc.stdout)
    # Hugging Face's package where it is installed; else at most a namespace (origin None).
    assert origin is None or REPO / "kernels" not in Path(origin).resolve().parents, origin


def test_importing_the_package_imports_no_test_or_demo_model():
    code = ("import sys, culture_neurons; "
            "print([m for m in sys.modules if m.startswith(('culture_neurons.testing', "
            "'culture_neurons.demo', 'triton'))])")  # fmt: skip
    proc = in_repo_root(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_m_from_the_repository_root():
    proc = in_repo_root(sys.executable, "-m", "culture_neurons", "run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout


@pytest.mark.slow
def test_torchrun_m_from_the_repository_root(tmp_path):
    """The README's multi-process command, 2 gloo ranks on CPU, equals one process."""
    assets = save_cli_assets(tmp_path, "llama")
    args = ["record", "--model", assets["model"], "--data", assets["data"], "--min-items", "4",
            "--identify-on", "all", "--batch-size", "2", "--quiet"]  # fmt: skip
    proc = in_repo_root(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "culture_neurons", *args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = in_repo_root(sys.executable, "-m", "culture_neurons", *args, "--out",
                       str(tmp_path / "one"))  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    from culture_neurons.stats import load_stats

    a, b = load_stats(tmp_path / "one"), load_stats(tmp_path / "two")
    assert a.T.tolist() == b.T.tolist() and bool((a.K == b.K).all())


def test_the_console_script_entry_point_resolves():
    """`culture-neurons` (the README's command) is setup.py's entry point: it must name the
    CLI's real module (a stale one passes every in-process test and fails every user). It and
    `python -m culture_neurons` end through cli.entry (distributed.exit_process: under
    torchrun no teardown, where a gloo rank aborted now and then)."""
    import importlib
    import re

    from culture_neurons.pipeline import cli

    spec = re.search(r'"culture-neurons=([\w.]+):(\w+)"', (REPO / "setup.py").read_text())
    assert spec, "setup.py declares no culture-neurons console script"
    module, attr = spec.groups()
    assert getattr(importlib.import_module(module), attr) is cli.entry
    assert "entry()" in (REPO / "culture_neurons" / "__main__.py").read_text()

