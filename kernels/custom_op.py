"""The op's body on every device (:func:`run`: the chosen path) and the custom op
``culture_neurons::act_and_record`` that wraps it under ``torch.compile`` (opaque to the
compiler, CUDA-graph safe). triton is imported only when a CUDA kernel is first launched.
"""

from __future__ import annotations

import dataclasses

import torch

from culture_neurons.errors import CultureNeuronsError

from . import dispatch, torch_path
from .args import OpArgs
from .check import self_check


def run(args: OpArgs, one_culture: int = -1) -> torch.Tensor:
    """The Triton kernel where :mod:`.dispatch` says so (a launch that raises is reported there
    and this call redone in PyTorch), else PyTorch. Arguments already checked; unused ones may
    be None (Triton) or anything (PyTorch)."""
    gate, variant = args.gate, args.variant
    if dispatch.use_kernel(gate.device, gate.dtype, variant, self_check):
        kernel = dispatch.triton_kernels()
        try:
            return kernel.launch(kernel.prepare(args), one_culture)
        except CultureNeuronsError:
            raise
        except Exception as exc:  # compile or launch error: loud, and this call in PyTorch
            dispatch.kernel_failed(gate.device, gate.dtype, variant, exc)
    return torch_path.run(args)


@torch.library.custom_op("culture_neurons::act_and_record", mutates_args=("K", "S", "Q"))
def _act_and_record_op(
    gate: torch.Tensor,
    up: torch.Tensor,
    culture: torch.Tensor,
    K: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    keep: torch.Tensor,
    set_ids: torch.Tensor,
    act_fn: str,
    activation: str,
    do_record: bool,
    do_ablate: bool,
    factor: float,
) -> torch.Tensor:
    return run(OpArgs(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                      do_ablate, factor))  # fmt: skip


@_act_and_record_op.register_fake
def _act_and_record_fake(gate, *rest):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def via_op(args: OpArgs) -> torch.Tensor:
    """The custom op, with an empty tensor for each unused argument (its schema wants them)."""
    dev, N = args.gate.device, args.gate.shape[1]
    unused = {}
    if not args.do_record:
        unused.update(culture=torch.empty(0, dtype=torch.int32, device=dev),
                      K=torch.empty(0, N, dtype=torch.int64, device=dev),
                      S=torch.empty(0, N, dtype=torch.float64, device=dev),
                      Q=torch.empty(0, N, dtype=torch.float64, device=dev))  # fmt: skip
    if not args.do_ablate:
        unused.update(keep=torch.empty(0, N, dtype=torch.uint8, device=dev),
                      set_ids=torch.empty(0, dtype=torch.int32, device=dev))  # fmt: skip
    args = dataclasses.replace(args, factor=float(args.factor), **unused)
    return _act_and_record_op(*args.positional())
