"""The thread-count chooser CPU training steps run under (jobs and the demo model build)."""

from __future__ import annotations

import pytest

from tuneloop.train.thread_count import ThreadCountChooser


def steps(chooser: ThreadCountChooser, n: int, seconds: dict[int, float]) -> list[int]:
    """Runs `n` steps taking `seconds[threads]` each; the thread counts used."""
    used = []
    for _ in range(n):
        threads = chooser.next_threads()
        chooser.record(threads, seconds[threads])
        used.append(threads)
    return used


def test_keeps_the_faster_setting_and_backs_off_after_a_losing_probe() -> None:
    chooser = ThreadCountChooser(2, interval=4, max_interval=8)
    idle = {1: 1.0, 2: 0.6}
    # Warm-up and two timed steps on one thread; the probe on two wins and stays.
    assert steps(chooser, 7, idle) == [1, 1, 1, 2, 2, 2, 2]
    # Step 7 probes one thread, which loses: the next probe waits 8 steps instead of 4.
    assert steps(chooser, 9, idle) == [1, 2, 2, 2, 2, 2, 2, 2, 1]
    assert chooser.steps_by_threads == {1: 5, 2: 11}


def test_a_sudden_slowdown_brings_the_next_probe_forward() -> None:
    chooser = ThreadCountChooser(2, interval=4, max_interval=64)
    assert steps(chooser, 7, {1: 1.0, 2: 0.6}) == [1, 1, 1, 2, 2, 2, 2]
    busy = {1: 1.0, 2: 20.0}  # another process takes a core: two threads wait on each other
    # Step 7 probes one thread and loses (1 s against 0.6 s), which puts the next probe at 15;
    # step 8 takes 20 s on two threads, so step 9 probes one thread at once, and it stays.
    assert steps(chooser, 4, busy) == [1, 2, 1, 1]


def test_starts_on_all_cores_when_asked() -> None:
    chooser = ThreadCountChooser(4, start=4, interval=4)
    assert steps(chooser, 5, {1: 2.0, 4: 0.5}) == [4, 4, 4, 1, 4]


def test_refuses_a_start_it_would_never_probe_against() -> None:
    with pytest.raises(ValueError, match="start must be 1 or 4"):
        ThreadCountChooser(4, start=2)
