"""``python -m culture_neurons`` (and ``torchrun ... -m culture_neurons``): the CLI."""

import sys

from .cli import main

sys.exit(main())
