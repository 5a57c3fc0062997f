"""``python -m culture_neurons`` (and ``torchrun ... -m culture_neurons``): the CLI."""

from culture_neurons.pipeline.cli import main
from culture_neurons.pipeline.distributed import exit_process

exit_process(main())
