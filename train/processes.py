"""A job's place among the processes that train it. Under `accelerate launch` (torchrun) every
process runs the whole job function, and the launcher tells each its rank in the environment;
only rank 0 writes the status file, the version dir and its manifest, so that the other ranks
never race on them. Run directly, a job is rank 0 of one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class JobProcesses:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine, which share its cores

    @property
    def main(self) -> bool:
        return self.rank == 0


def job_processes(env: Mapping[str, str] | None = None) -> JobProcesses:
    """This process's rank and the world's size, as torchrun sets them (`RANK`, `WORLD_SIZE`,
    `LOCAL_WORLD_SIZE`)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    return JobProcesses(
        rank=int(env.get("RANK", 0)),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
    )


def threads_per_process(cores: int, processes: JobProcesses) -> int:
    """This process's share of the machine's cores: 2 processes on 2 cores get one thread each,
    as two of torch's thread pools on the same cores wait on each other (see
    `thread_count.ThreadCountChooser`)."""
    return max(1, cores // max(processes.local_world_size, 1))
