"""Trainer callbacks every job uses: progress reporting, and CPU thread picking."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneloop.train.job_common import StatusFile
from tuneloop.train.job_config import JobError


def job_callbacks(status: StatusFile) -> list[TrainerCallback]:
    """The status callback, plus the thread picker when training on the CPU."""
    callbacks: list[TrainerCallback] = [StatusCallback(status)]
    cores = len(os.sched_getaffinity(0))
    if not torch.cuda.is_available() and cores > 1:
        callbacks.append(ThreadPicker(cores))
    return callbacks


class StatusCallback(TrainerCallback):
    """Writes progress after each logging step; stops the job when the loss is not finite."""

    def __init__(self, status: StatusFile) -> None:
        self.status = status

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.status.total_steps = state.max_steps
        self.status.write("running")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        self.status.step = state.global_step
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise JobError(
                    f"training diverged: loss is {loss} at step {state.global_step}; "
                    "lower learning_rate"
                )
            self.status.loss = loss
        self.status.metrics.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        self.status.write("running")


class ThreadPicker(TrainerCallback):
    """Runs training steps on one thread or on one per core, whichever is faster at the moment.

    While another process (the chat server, another job) keeps a core busy, torch's threads wait
    on each other: an RL job on the tiny model took 37 s on 2 threads against 6 s on one, and
    single steps 80 times slower. On an idle machine, all cores are faster. So the job starts on
    one thread and now and then times one step on the other setting, keeping the faster; a probe
    that loses doubles the wait before the next (from `interval` up to `max_interval` steps), and
    a step three times slower than the recent ones brings the next probe forward. Evaluation
    after training keeps the last choice (`run_job` restores the thread count afterwards).
    """

    def __init__(self, cores: int, *, interval: int = 8, max_interval: int = 64) -> None:
        self.best, self.other = 1, cores
        self.base_interval, self.max_interval = interval, max_interval
        self.interval, self.next_probe = interval, 3  # after the warm-up and two timed steps
        self.recent: list[float] = []  # step times on `best`, latest last
        self._threads, self._probing, self._started = 1, False, 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._probing = state.global_step == self.next_probe
        self._threads = self.other if self._probing else self.best
        torch.set_num_threads(self._threads)
        self._started = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        seconds = time.perf_counter() - self._started
        step = state.global_step - 1  # the step that just ended, as on_step_begin saw it
        if step == 0:
            return  # warm-up: one-off costs
        if not self._probing:
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
