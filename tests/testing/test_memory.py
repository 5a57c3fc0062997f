"""peak_bytes against allocations whose sizes are known."""

from __future__ import annotations

import torch

from culture_neurons.testing.memory import peak_bytes

MB = 1 << 20


def test_peak_counts_what_the_call_holds_at_once_above_its_start():
    before = torch.empty(8 * MB, dtype=torch.uint8)  # allocated before: never counted

    def call():
        a = torch.empty(3 * MB, dtype=torch.uint8)
        b = torch.empty(2 * MB, dtype=torch.uint8)  # a + b = 5 MB live: the peak
        del a, b
        c = torch.empty(4 * MB, dtype=torch.uint8)
        return c

    assert peak_bytes(call) == 5 * MB
    assert peak_bytes(lambda: before.zero_()) == 0  # in place: nothing allocated


def test_what_the_call_keeps_counts_and_freeing_older_tensors_does_not_go_below_zero():
    kept = []
    older = [torch.empty(6 * MB, dtype=torch.uint8)]
    assert peak_bytes(lambda: kept.append(torch.empty(MB, dtype=torch.uint8))) == MB
    assert peak_bytes(lambda: older.clear()) == 0
