"""The PyTorch reduction every non-Triton path shares; it lives with the kernels
(:mod:`culture_neurons.kernels.reduce`, which imports nothing from the instrument) and is
re-exported here under its former name."""

from culture_neurons.kernels.reduce import (
    CHUNK_ROWS,
    CPU_CHUNK_BYTES,
    ablate,
    ablate_,
    ablated_rows,
    accumulate,
    chunk_rows_for,
)

__all__ = ["CHUNK_ROWS", "CPU_CHUNK_BYTES", "ablate", "ablate_", "ablated_rows", "accumulate",
           "chunk_rows_for"]
