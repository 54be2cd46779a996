"""Benchmark: what storing one chat answer costs the store's writer, for a new chat against a
conversation this process did not start (one stored before a restart, or by the importer).

Every streamed answer ends in one `FeedbackStore.submit_response`; under many streams the writer
thread's CPU is taken from the engine on a small machine. A new chat's first answer is written
with plain inserts; a conversation the process has not seen needs a lookup of what is stored and
`ON CONFLICT DO NOTHING` on its row. Answers are submitted one at a time (each waits for its
commit, as under light load), the two kinds alternating round by round in one run.

    python bench/store_responses.py [--answers 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tuneloop.core.records import Message, Response, SamplingParams
from tuneloop.feedback.store import FeedbackStore


def answer(store: FeedbackStore, conversation_id: int, n: int) -> Response:
    return Response(
        id=store.new_response_id(),
        conversation_id=conversation_id,
        prompt=(Message("user", f"Question {n}: what does the scheduler module do? " * 3),),
        text="It starts a training cycle when enough new feedback arrived. " * 4,
        model_version_id="policy-v1",
        params=SamplingParams(64, 0.0, 1.0),
        prompt_tokens=40,
        completion_tokens=64,
        latency_ms=120.0,
    )


def cpu_ms_per_answer(store: FeedbackStore, conversation: Callable[[], int], n: int) -> float:
    started = time.process_time()  # every thread of this process: the writer's work included
    for i in range(n):
        store.submit_response(answer(store, conversation(), i)).result()
    return (time.process_time() - started) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=1000, help="per round")
    parser.add_argument("--rounds", type=int, default=4, help="per kind")
    args = parser.parse_args(argv)
    kinds = {
        "new chat": lambda s: s.new_conversation_id(),
        "not started here": lambda s: s.reserve_conversation_id(),
    }
    results: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp, FeedbackStore(Path(tmp) / "f.duckdb") as store:
        cpu_ms_per_answer(store, store.new_conversation_id, 200)  # warm-up
        for i in range(args.rounds):
            order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
            for kind in order:
                ms = cpu_ms_per_answer(store, lambda k=kind: kinds[k](store), args.answers)
                results[kind].append(ms)
                print(f"  round {i + 1} {kind:<17} {ms:6.2f} CPU ms per answer")
    new, other = (statistics.median(results[k]) for k in kinds)
    print(f"median CPU ms per stored answer: new chat {new:.2f}, not started here {other:.2f}")
    print(f"new chat / not started here: {new / other:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
