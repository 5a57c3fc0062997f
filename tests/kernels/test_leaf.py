"""kernels/ is a leaf: its modules import nothing from culture_neurons but its errors, so the
instrument and the statistics may import from it and never the reverse (issue #27)."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imports(path: Path) -> list[str]:
    """Every absolute module a file imports (``from x import y`` gives x, ``import x`` x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module)
    return found


def test_kernels_import_only_errors_from_the_package():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 8  # the folder was found, with its modules
    outside = {f.name: m for f in files for m in _imports(f)
               if m.split(".")[0] == "culture_neurons" and m != "culture_neurons.errors"}
    assert outside == {}


def test_kernel_files_stay_small():
    sizes = {f.name: len(f.read_text(encoding="utf-8").splitlines()) for f in KERNELS.glob("*.py")}
    assert max(sizes.values()) <= 500, sizes
