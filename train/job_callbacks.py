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
from tuneloop.train.processes import job_processes, threads_per_process
from tuneloop.train.thread_count import ThreadCountChooser


def job_callbacks(status: StatusFile) -> list[TrainerCallback]:
    """The status callback, plus the thread picker when training on the CPU in one process.

    Several processes on one machine (`accelerate launch`) share its cores evenly instead: each
    waits for the others at every step's gradient all-reduce, so one that probed a thread count
    would time the others' steps, not its own."""
    callbacks: list[TrainerCallback] = [StatusCallback(status)]
    if torch.cuda.is_available():
        return callbacks
    cores, processes = len(os.sched_getaffinity(0)), job_processes()
    if processes.local_world_size > 1:
        torch.set_num_threads(threads_per_process(cores, processes))
    elif cores > 1:
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
        self.status.stage = "training"
        self.status.write("running")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.status.stage = "evaluating and saving"
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
    """Runs each training step on the thread count a `ThreadCountChooser` picks, starting on one
    thread. Evaluation after training keeps the last choice (`train_version` restores the thread
    count afterwards)."""

    def __init__(self, cores: int) -> None:
        self.chooser = ThreadCountChooser(cores)
        self._threads, self._started = 1, 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._threads = self.chooser.next_threads()
        torch.set_num_threads(self._threads)
        self._started = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.chooser.record(self._threads, time.perf_counter() - self._started)
