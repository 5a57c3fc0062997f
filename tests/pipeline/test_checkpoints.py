"""The identification checkpoint policy: by wall time (a fake clock here), and optionally every
N batches as well; never one after the last batch (the final save follows)."""

from __future__ import annotations

from culture_neurons.pipeline.run import Checkpoints


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_checkpoints_follow_wall_time():
    clock = Clock()
    cp = Checkpoints(minutes=10, clock=clock)
    clock.now += 9 * 60
    assert not cp.due(1)
    clock.now += 60
    assert cp.due(2)
    cp.saved()  # the clock restarts from the save
    clock.now += 5 * 60
    assert not cp.due(3)
    clock.now += 5 * 60
    assert cp.due(4)


def test_batches_add_checkpoints_and_zero_minutes_turns_time_off():
    clock = Clock()
    cp = Checkpoints(minutes=0, batches=3, clock=clock)
    clock.now += 10**6
    assert [b for b in range(1, 10) if cp.due(b)] == [3, 6, 9]
    assert not any(Checkpoints(minutes=0, clock=clock).due(b) for b in range(1, 10))
