"""``python -m culture_neurons`` (and ``torchrun ... -m culture_neurons``): the CLI."""

import sys

from culture_neurons.pipeline.cli import main

sys.exit(main())
