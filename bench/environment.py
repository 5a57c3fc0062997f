"""What a benchmark ran on: the header every bench script can write beside its numbers."""

from __future__ import annotations

import os

import torch

from culture_neurons.kernels import dispatch


def header(dev) -> dict:
    """Versions (torch, triton, transformers), the kernel mode and the device: name, compute
    capability and the fused kernel's tile there."""
    info = {"torch": torch.__version__, "device": str(dev),
            "kernel_mode": os.environ.get(dispatch.MODE_ENV, "auto"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"absent ({type(exc).__name__}: {exc})"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as exc:
        info["transformers"] = f"absent ({exc})"
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        info["capability"] = f"sm_{major}{minor}"
        try:
            from culture_neurons.kernels.act_record import tile_for

            t = tile_for(dev)
            info["tile"] = f"{t.block_r}x{t.block_n}x{t.num_warps}"
        except Exception as exc:
            info["tile"] = f"unavailable ({type(exc).__name__}: {exc})"
    else:
        info["name"] = f"CPU ({os.cpu_count()} cores)"
    return info
