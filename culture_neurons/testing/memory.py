"""Peak tensor memory of a call, measured the same way for every recording path.

Used by the tests (recording allocates nothing per token that grows with layers) and by
``bench/bench_record.py`` (``peak_mib`` per provider), so both read one definition:

    peak = the highest total of live tensor bytes on ``device`` during the call, minus the
           total when it started (model weights, inputs and totals allocated before are not
           counted; what the call allocates and keeps, e.g. stored activations, is).

CUDA: ``torch.cuda.max_memory_allocated`` after a ``reset_peak_memory_stats``, minus
``memory_allocated`` before (the caching allocator's reserved-but-free blocks are not counted).
CPU: the profiler's allocation events (every allocation and free of the CPU allocator, in
order, in this thread and its greenlets: nnsight's interventions run in greenlets), summed as
a running total. The profiler slows the call down: measure memory and time in separate runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from culture_neurons.errors import UsageError


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak live tensor bytes on ``device`` that ``fn()`` allocates above the start (see the
    module doc). ``fn``'s return value is dropped after the measurement."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise UsageError(f"peak_bytes measures cpu or cuda, got {device}")
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError as exc:  # a private name: say what broke rather than report 0
        raise UsageError(f"this torch's profiler has no allocation events ({exc}); measure "
                         "CPU peak memory with another torch version") from exc  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))  # < 0: a free
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak
