"""Which path runs the fused op: the Triton kernel, checked once on each device, or PyTorch.

The Triton kernel is the default for CUDA tensors; every other device runs the PyTorch path
(that is the design, not a fallback). The first time the kernel would run on a (device, dtype,
variant), where variant = (act_fn, activation, record, ablate, steer), it first runs a
self-check (``check.self_check``: a small case through the kernel and through the PyTorch path
on that device; counts must agree exactly, sums and ``h`` within rounding). If the check finds
a difference, or triton is missing, or the kernel raises, that is one loud event (an ERROR log
line and a :class:`KernelFallbackWarning` naming the device and the difference) and that
(device, dtype, variant) takes the PyTorch path from then on: same numbers, slower. Never a
silent fallback that a benchmark would then time as "fused".

``CULTURE_NEURONS_KERNEL`` chooses (read when a new (device, dtype, variant) is first seen):
    auto    (default) as above
    triton  the kernel is forced: any such event raises :class:`KernelError` instead of falling
            back; on the CPU it runs Triton's interpreter (needs TRITON_INTERPRET=1; tests)
    torch   the PyTorch path everywhere

:func:`status` says what was decided (``bench/gpu_check.py`` fails on any fallback).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from collections.abc import Callable

import torch

from culture_neurons.errors import CultureNeuronsError, KernelError, UsageError

log = logging.getLogger(__name__)

MODE_ENV = "CULTURE_NEURONS_KERNEL"
MODES = ("auto", "triton", "torch")
KERNEL_DEVICES = ("cuda",)  # device types whose tensors take the Triton kernel under "auto"


class KernelFallbackWarning(RuntimeWarning):
    """The Triton kernel was expected but the PyTorch path runs instead (see the message)."""


Key = tuple  # (torch.device, torch.dtype, variant tuple)
_verdicts: dict[Key, bool] = {}  # True: the kernel (checked); False: the PyTorch path
_fallbacks: dict[str, str] = {}  # what fell back -> why
_checked: list[str] = []  # what passed its self-check


def mode() -> str:
    """``CULTURE_NEURONS_KERNEL``: auto (default), triton or torch."""
    how = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if how not in MODES:
        raise UsageError(f"{MODE_ENV}={how!r} is not one of {MODES}; unset it (auto) or pick one")
    return how


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_kernels():
    """``culture_neurons.kernels.act_record`` (imports triton); raises what the import raised."""
    return importlib.import_module(f"{__package__}.act_record")


def use_kernel(device: torch.device, dtype: torch.dtype, variant: tuple,
               check: Callable[[torch.device, torch.dtype, tuple], str | None]) -> bool:  # fmt: skip
    """True when this call should launch the Triton kernel (one dict lookup once decided).

    ``check(device, dtype, variant)`` is the self-check, run once per key before the kernel is
    trusted: None when it agrees with the PyTorch path, else the difference in words.

    Raises:
        KernelError: the kernel is forced (``CULTURE_NEURONS_KERNEL=triton``) and unavailable,
            broken or wrong here.
    """
    key = (device, dtype, variant)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _decide(key, check)
    return verdict


def kernel_failed(device: torch.device, dtype: torch.dtype, variant: tuple,
                  exc: Exception) -> None:  # fmt: skip
    """A launch raised after the self-check passed: the PyTorch path from now on (loud), or
    KernelError when forced."""
    _fall_back((device, dtype, variant), f"the kernel raised {type(exc).__name__}: {exc}",
               cause=exc)  # fmt: skip


def status() -> dict:
    """``{"mode", "checked": [...], "fallbacks": {what: why}}`` of this process so far."""
    return {"mode": mode(), "checked": list(_checked), "fallbacks": dict(_fallbacks)}


def reset() -> None:
    """Forget every decision (tests; a changed ``CULTURE_NEURONS_KERNEL``)."""
    _verdicts.clear()
    _fallbacks.clear()
    _checked.clear()


# --- deciding ----------------------------------------------------------------------------------


def describe(key: Key) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3), torch.bfloat16, silu/gate record ablate``."""
    device, dtype, (act_fn, activation, record, ablate, steer) = key
    where = str(device)
    if device.type == "cuda":
        try:
            where += f" ({torch.cuda.get_device_name(device)})"
        except Exception:  # a broken driver must not hide the message that says so
            pass
    switches = [name for name, on in (("record", record), ("ablate", ablate), ("steer", steer))
                if on]  # fmt: skip
    return f"{where}, {dtype}, {act_fn}/{activation} {' '.join(switches) or 'plain'}"


def _decide(key: Key, check) -> bool:
    device, dtype, variant = key
    how = mode()
    if how == "torch":
        _verdicts[key] = False
        return False
    if device.type not in KERNEL_DEVICES:
        if how == "auto":  # the PyTorch path is this device's design, not a fallback
            _verdicts[key] = False
            return False
        if not (device.type == "cpu" and interpreting()):
            raise KernelError(
                f"{MODE_ENV}=triton forces the Triton kernel, but {device} tensors have no Triton "
                "backend (CUDA, or the CPU interpreter with TRITON_INTERPRET=1); unset "
                f"{MODE_ENV} to run the PyTorch path there"
            )
    try:
        triton_kernels()
    except Exception as exc:  # ImportError, or a triton that breaks while importing
        return _fall_back(key, f"triton is unavailable ({type(exc).__name__}: {exc})", cause=exc)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The check compares on the host, which a CUDA graph capture forbids: trust the kernel
        # for this capture only (not remembered), and say so.
        warnings.warn(f"the Triton kernel runs unchecked on {describe(key)}: its first call is "
                      "inside a CUDA graph capture; run one eager call before capturing",
                      KernelFallbackWarning, stacklevel=4)  # fmt: skip
        return True
    try:
        difference = check(device, dtype, variant)
    except CultureNeuronsError:
        raise
    except Exception as exc:  # a compile or launch error: the kernel is broken here
        return _fall_back(key, f"the self-check raised {type(exc).__name__}: {exc}", cause=exc)
    if difference:
        return _fall_back(key, f"the self-check found the kernel wrong: {difference}")
    _checked.append(describe(key))
    log.info("Triton kernel checked against the PyTorch path on %s", describe(key))
    _verdicts[key] = True
    return True


def _fall_back(key: Key, reason: str, cause: Exception | None = None) -> bool:
    _verdicts[key] = False
    what = describe(key)
    if mode() == "triton":
        raise KernelError(f"Triton kernel on {what}: {reason}; it is forced ({MODE_ENV}=triton): "
                          f"unset {MODE_ENV} to fall back to the PyTorch path") from cause
    _fallbacks[what] = reason
    message = (f"Triton kernel NOT used on {what}: {reason}. This device, dtype and variant "
               "take the PyTorch path from now on (same numbers, slower). Set "
               f"{MODE_ENV}=triton to make this an error.")  # fmt: skip
    log.error(message)
    warnings.warn(message, KernelFallbackWarning, stacklevel=4)
    return False
