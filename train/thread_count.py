"""Choosing, step by step, whether CPU training runs on one thread or on one per core."""

from __future__ import annotations


class ThreadCountChooser:
    """Keeps whichever of one thread and one per core trains faster at the moment.

    While another process (the chat server, another job) keeps a core busy, torch's threads wait
    on each other: an RL job on the tiny model took 37 s on 2 threads against 6 s on one, and
    single steps 80 times slower. On an idle machine all cores are faster (about 1.8x on 2).

    So training runs on `start` threads and now and then times one step on the other setting,
    keeping the faster. A probe that loses doubles the wait before the next (from `interval` up
    to `max_interval` steps); a step three times slower than the recent ones brings the next probe
    forward. The first step is a warm-up with one-off costs and is not compared.

    Call `next_threads()` before a step and `record()` with its duration after it.
    """

    def __init__(
        self, cores: int, *, start: int = 1, interval: int = 8, max_interval: int = 64
    ) -> None:
        if start not in (1, cores):
            raise ValueError(f"start must be 1 or {cores} threads, not {start}")
        self.best, self.other = start, (cores if start == 1 else 1)
        self.base_interval, self.max_interval = interval, max_interval
        self.interval, self.next_probe = interval, 3  # after the warm-up and two timed steps
        self.recent: list[float] = []  # step times on `best`, latest last
        self.steps_by_threads: dict[int, int] = {}
        self._step = 0

    def next_threads(self) -> int:
        """The thread count for the next step."""
        return self.other if self._step == self.next_probe else self.best

    def record(self, threads: int, seconds: float) -> None:
        """The step just taken ran on `threads` threads (as `next_threads()` said) for `seconds`."""
        step, probing = self._step, self._step == self.next_probe
        self._step += 1
        self.steps_by_threads[threads] = self.steps_by_threads.get(threads, 0) + 1
        if step == 0:
            return
        if not probing:
            if len(self.recent) >= 2 and seconds > 3 * _median(self.recent):
                # Conditions changed: probe next, against the new step times.
                self.next_probe, self.recent = min(self.next_probe, step + 1), [seconds]
            else:
                self.recent = [*self.recent[-2:], seconds]
            return
        if not self.recent or seconds < 0.9 * _median(self.recent):
            self.best, self.other = self.other, self.best
            self.recent, self.interval = [seconds], self.base_interval
        else:
            self.interval = min(2 * self.interval, self.max_interval)
        self.next_probe = step + self.interval


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
