"""Imported by every bench script before ``culture_neurons``: ``python bench/X.py`` puts
``bench/`` first on ``sys.path``, so without this an installed (possibly older) copy of the
package would be measured instead of this checkout's. Only when a bench script is the program
itself: a test that imports a bench module keeps the package it already tests."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = str(BENCH.parent)
if sys.argv and sys.argv[0] and Path(sys.argv[0]).resolve().parent == BENCH and ROOT not in sys.path:
    sys.path.insert(0, ROOT)
