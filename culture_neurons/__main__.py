"""``python -m culture_neurons`` (and ``torchrun ... -m culture_neurons``): the CLI."""

from culture_neurons.pipeline.cli import entry

entry()
