"""CPU lists (`0-3,6`, as taskset and /proc write them) and keeping this process off some CPUs.

On a machine where vLLM's processes and tuneloop's share the cores, each takes CPU time the other
needed; `--vllm-cpus` gives vLLM its own cores and tuneloop the rest (bench/RESULTS.md)."""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> frozenset[int]:
    """`0-3,6` -> {0, 1, 2, 3, 6}; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (write it as 0-3,6)")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r} ({part} runs backwards)")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int]) -> str:
    """{0, 1, 2, 3, 6} -> `0-3,6`."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def keep_off(cpus: frozenset[int]) -> frozenset[int]:
    """Move every thread of this process off `cpus`, onto the others it may use; threads it
    starts later inherit that. Returns the CPUs it now runs on (unchanged if none would be
    left)."""
    allowed = frozenset(os.sched_getaffinity(0))
    rest = allowed - cpus
    if not rest or rest == allowed:
        return allowed
    run_on(rest)
    return rest


def run_on(cpus: frozenset[int]) -> None:
    """Put every thread of this process on `cpus`; threads it starts later inherit that."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            continue
