"""CPU lists, and moving a running process's threads off vLLM's CPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tuneloop.core.cpu_affinity import format_cpu_list, parse_cpu_list
from tuneloop.serve.vllm_server import VllmLaunch


def test_cpu_lists_read_and_write_as_taskset_does() -> None:
    assert parse_cpu_list("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpu_list(" 2 , 0-1") == {0, 1, 2}
    assert format_cpu_list(frozenset({6, 0, 1, 2, 3, 9, 10})) == "0-3,6,9-10"
    for bad in ("", "a", "1-", "-1", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(bad)


def test_vllm_starts_under_taskset_when_given_cpus() -> None:
    pinned = VllmLaunch(("python", "-m", "vllm"), "m", cpus=frozenset({0, 1, 5}), nice=5)
    assert pinned.argv("s")[:8] == ["taskset", "-c", "0-1,5", "nice", "-n", "5", "python", "-m"]
    assert VllmLaunch(("python",), "m").argv("s")[0] == "python"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_keep_off_and_run_on_move_every_thread_including_ones_started_before() -> None:
    """In a process of its own: the test process keeps its CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    code = f"""
import os, threading
from tuneloop.core.cpu_affinity import keep_off, run_on
started = threading.Event(); done = threading.Event()
def before():
    started.set(); done.wait()
t = threading.Thread(target=before); t.start(); started.wait()
print(sorted(keep_off(frozenset({{{cpus[0]}}}))))
after = []
t2 = threading.Thread(target=lambda: after.append(sorted(os.sched_getaffinity(0)))); t2.start()
t2.join()
print(sorted(os.sched_getaffinity(t.native_id)), after[0], sorted(os.sched_getaffinity(0)))
print(sorted(keep_off(frozenset(os.sched_getaffinity(0)))))
run_on(frozenset({cpus!r}))
print(sorted(os.sched_getaffinity(t.native_id)), sorted(os.sched_getaffinity(0)))
done.set(); t.join()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    rest = str(cpus[1:])
    # Keeping off all of them would leave nothing: unchanged. `run_on` gives every thread all back.
    assert out == [rest, f"{rest} {rest} {rest}", rest, f"{cpus} {cpus}"]
