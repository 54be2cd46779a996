"""Handing rating tasks to raters: which task next, to whom, shown how.

The tasks live in the database (`tuneloop.feedback.tasks`); who holds which task right now lives
here, in memory, under one lock, so that fetching a task costs no write and no scan (a fetch
with 100,000 tasks queued: bench/rating_queue.py). The rules:
- a task goes to `overlap` raters, never to its prompt's author, and never twice to one rater
  (judged, skipped, or held before);
- a rater holds a task (a lease) until they judge or skip it, or `lease_s` passes; while held,
  the slot is theirs, so a task never gets more than `overlap` judgments through the queue;
- tasks are handed out in order of need: higher priority first, then tasks already started (so
  that they complete), then the others in the order the selection policy gives those of normal
  priority: `oldest` first, `random`, or `active` (the most informative to the reward model
  first, `feedback.task_scores`; unscored ones after them, oldest first); a canary's tasks
  always oldest first, since the human gate's verdict wants an unbiased sample;
- gold tasks go to every rater once, one fetch in `gold_every`;
- a quarantined rater (`feedback.raters`) gets gold tasks only: their votes train nothing, so
  the tasks that need judging go to raters in good standing, while gold still shows whether
  they improved (`held`, kept by the desk);
- the answers are shown in an order drawn for each rater, without their versions.
A restart forgets the leases (their slots come free) and keeps judgments and skips.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tuneloop.core.records import Comparison, Feedback, Ranking, Winner
from tuneloop.core.settings import TASK_SELECTIONS
from tuneloop.feedback.raters import quarantined
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.tasks import (
    PRIORITY_NORMAL,
    Task,
    TaskKind,
    judgments_by_rater,
    load_tasks,
    record_skip,
)
from tuneloop.feedback.validation import FeedbackError

DEFAULT_LEASE_S = 15 * 60
DEFAULT_GOLD_EVERY = 10


class NoSuchTaskError(KeyError):
    """The caller holds no lease on this task (never given, expired and taken, or done)."""


@dataclass(frozen=True)
class Lease:
    task_id: int
    kind: TaskKind
    rater: str
    order: tuple[int, ...]  # the task's response ids in the order this rater sees them
    expires: float

    def feedback(
        self, *, winner: Winner | None = None, ranking: list[int] | None = None
    ) -> Feedback:
        """The vote this rater's verdict is: `winner` of the two answers as shown (a, b, tie,
        both_bad), or `ranking`, the positions shown (0-based), best first."""
        if self.kind == "comparison":
            if winner is None or ranking is not None:
                raise FeedbackError("a comparison task takes a winner: a, b, tie or both_bad")
            return Comparison(self.order[0], self.order[1], winner, self.rater, self.task_id)
        if ranking is None or winner is not None:
            raise FeedbackError(
                "a ranking task takes a ranking: the answers' positions, best first"
            )
        if sorted(ranking) != list(range(len(self.order))):
            raise FeedbackError(
                f"a ranking orders every answer shown once: positions 0 to {len(self.order) - 1}"
            )
        return Ranking(tuple(self.order[i] for i in ranking), self.rater, self.task_id)


@dataclass
class _Open:
    """A task still wanting judgments, and who has it."""

    task: Task
    judged: set[str]
    seen: set[str]  # judged, skipped, or ever held
    leases: dict[str, Lease] = field(default_factory=dict)  # expired ones too, until replaced

    def free_slots(self, now: float, *, besides: str | None = None) -> int:
        held = sum(1 for r, lease in self.leases.items() if lease.expires > now and r != besides)
        return self.task.overlap - len(self.judged) - held

    @property
    def missing(self) -> int:
        return self.task.overlap - len(self.judged)


class TaskQueue:
    """Thread-safe; see the module's docstring."""

    def __init__(
        self,
        store: FeedbackStore,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        gold_every: int = DEFAULT_GOLD_EVERY,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        selection: str = "oldest",
    ) -> None:
        if selection not in TASK_SELECTIONS:
            choices = ", ".join(TASK_SELECTIONS)
            raise ValueError(f"a selection is one of {choices}, not {selection!r}")
        self._store = store
        self._selection = selection
        self._info: dict[int, float] = {}  # task id -> information, for `active`
        self._lease_s = lease_s
        self._gold_every = gold_every
        self._clock = clock
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        # Tasks begun, by (-priority, judgments missing), each bucket in the order they began.
        self._started: dict[tuple[int, int], dict[int, None]] = {}
        self._fresh: dict[int, deque[int]] = {}  # priority -> tasks not begun, oldest first
        self._gold: dict[int, None] = {}
        self._holding: dict[str, dict[int, None]] = {}  # rater -> the tasks they hold
        self._seen_open: dict[str, int] = {}  # rater -> open tasks (not gold) they have seen
        self._fetches: dict[str, int] = {}
        self._judged_by: dict[str, int] = {}
        self._held_raters: frozenset[str] = frozenset()
        self.reload()

    def reload(self) -> None:
        """Read the open tasks from the database again (leases are kept)."""
        tasks = load_tasks(self._store)
        judged = judgments_by_rater(self._store)
        with self._lock:
            old = self._open
            self._open, self._started, self._fresh, self._gold = {}, {}, {}, {}
            self._holding, self._seen_open = {}, {}
            for task in tasks:
                self._add(task, old[task.id].leases if task.id in old else {})
            self._judged_by = judged
            self._order_fresh()
        self.read_held()

    def read_held(self) -> frozenset[str]:
        """Read who is quarantined (after a change to the quarantine); they get gold tasks
        only from their next fetch."""
        held = frozenset(r["rater_id"] for r in quarantined(self._store))
        with self._lock:
            self._held_raters = held
        return held

    def apply_information(self, info: dict[int, float]) -> None:
        """New scores of the tasks (`feedback.task_scores.task_information`): with the `active`
        selection, the tasks not begun are asked in their order from now on."""
        with self._lock:
            self._info = dict(info)
            self._order_fresh()

    def _order_fresh(self) -> None:
        """Put the tasks of normal priority not begun in the selection's order."""
        waiting = self._fresh.get(PRIORITY_NORMAL)
        if not waiting or self._selection == "oldest":
            return
        ids = list(waiting)
        if self._selection == "random":
            self._random.shuffle(ids)
        else:
            unknown = float("-inf")  # unscored: after the scored ones, oldest first
            ids.sort(key=lambda tid: (-self._info.get(tid, unknown), tid))
        self._fresh[PRIORITY_NORMAL] = deque(ids)

    def add(self, task_ids: list[int]) -> None:
        """Take newly stored tasks into the queue."""
        wanted = set(task_ids)
        fresh = [t for t in load_tasks(self._store) if t.id in wanted]
        with self._lock:
            for task in fresh:
                if task.id not in self._open:
                    self._add(task, {})
            if self._selection == "random" and fresh:
                self._order_fresh()

    def _add(self, task: Task, leases: dict[str, Lease]) -> None:
        entry = _Open(task, set(task.judged_by), set(), dict(leases))
        self._open[task.id] = entry
        for rater in task.judged_by | task.skipped_by | leases.keys():
            self._see(entry, rater)
        for rater in leases:
            self._holding.setdefault(rater, {})[task.id] = None
        if task.gold:
            self._gold[task.id] = None
        elif task.judged_by or leases:
            self._start(entry)
        else:
            self._fresh.setdefault(task.priority, deque()).append(task.id)

    def _see(self, entry: _Open, rater: str) -> None:
        if rater not in entry.seen:
            entry.seen.add(rater)
            if not entry.task.gold:
                self._seen_open[rater] = self._seen_open.get(rater, 0) + 1

    def _bucket(self, entry: _Open) -> tuple[int, int]:
        return (-entry.task.priority, entry.missing)

    def _start(self, entry: _Open) -> None:
        self._started.setdefault(self._bucket(entry), {})[entry.task.id] = None

    def _unstart(self, entry: _Open) -> None:
        key = self._bucket(entry)
        bucket = self._started.get(key)
        if bucket is None:
            return
        bucket.pop(entry.task.id, None)
        if not bucket:
            del self._started[key]

    # ---- handing out -------------------------------------------------------------------------

    def next(self, rater: str, kind: TaskKind | None = None) -> Lease | None:
        """The task `rater` should judge now: the one they hold, else the most needed one they
        may take; None when there is none."""
        now = self._clock()
        with self._lock:
            held = self._held(rater, kind, now)
            if held is not None:
                return held
            if rater in self._held_raters:
                entry = self._first_takeable(self._gold, rater, kind, now)
                return self._lease(entry, rater, now) if entry is not None else None
            self._fetches[rater] = count = self._fetches.get(rater, 0) + 1
            entry = None
            if self._gold_every and count % self._gold_every == 0:
                entry = self._first_takeable(self._gold, rater, kind, now)
            entry = (
                entry
                or self._from_started(rater, kind, now)
                or self._from_fresh(rater, kind)
                or self._first_takeable(self._gold, rater, kind, now)
            )
            if entry is None:
                return None
            return self._lease(entry, rater, now)

    def _held(self, rater: str, kind: TaskKind | None, now: float) -> Lease | None:
        for tid in self._holding.get(rater, ()):
            lease = self._open[tid].leases[rater]
            if lease.expires > now and kind in (None, lease.kind):
                return lease
        return None

    def _takeable(self, entry: _Open, rater: str, kind: TaskKind | None, now: float) -> bool:
        task = entry.task
        return (
            rater not in entry.seen
            and rater != task.author
            and kind in (None, task.kind)
            and (task.gold or entry.free_slots(now) > 0)
        )

    def _first_takeable(
        self, task_ids: dict[int, None], rater: str, kind: TaskKind | None, now: float
    ) -> _Open | None:
        for tid in task_ids:
            entry = self._open[tid]
            if self._takeable(entry, rater, kind, now):
                return entry
        return None

    def _from_started(self, rater: str, kind: TaskKind | None, now: float) -> _Open | None:
        """Started tasks: higher priority first, then fewest judgments missing, then oldest."""
        for key in sorted(self._started):
            entry = self._first_takeable(self._started[key], rater, kind, now)
            if entry is not None:
                return entry
        return None

    def _from_fresh(self, rater: str, kind: TaskKind | None) -> _Open | None:
        """The oldest task not begun, of the highest priority this rater may take. Those passed
        over (their author's, of another kind, skipped before a restart) stay at the front."""
        for priority in sorted(self._fresh, reverse=True):
            waiting = self._fresh[priority]
            passed: list[int] = []
            found = None
            while waiting:
                tid = waiting.popleft()
                entry = self._open[tid]
                task = entry.task
                if rater in entry.seen or rater == task.author or kind not in (None, task.kind):
                    passed.append(tid)
                    continue
                found = entry
                self._start(entry)
                break
            waiting.extendleft(reversed(passed))
            if found is not None:
                return found
        return None

    def _lease(self, entry: _Open, rater: str, now: float) -> Lease:
        order = list(entry.task.response_ids)
        self._random.shuffle(order)
        lease = Lease(entry.task.id, entry.task.kind, rater, tuple(order), now + self._lease_s)
        entry.leases[rater] = lease
        self._holding.setdefault(rater, {})[entry.task.id] = None
        self._see(entry, rater)
        return lease

    def upcoming(self, n: int) -> list[tuple[int, tuple[int, ...]]]:
        """(task id, response ids) of up to `n` tasks not begun, next in line."""
        found: list[tuple[int, tuple[int, ...]]] = []
        with self._lock:
            for priority in sorted(self._fresh, reverse=True):
                for tid in itertools.islice(self._fresh[priority], n - len(found)):
                    found.append((tid, self._open[tid].task.response_ids))
                if len(found) >= n:
                    break
        return found

    # ---- answers -------------------------------------------------------------------------------

    def lease(self, rater: str, task_id: int) -> Lease:
        """The lease `rater` holds on a task; NoSuchTaskError when none is held. A lease that
        expired is still honoured (and renewed) while the task has a free slot."""
        now = self._clock()
        with self._lock:
            entry = self._open.get(task_id)
            lease = entry.leases.get(rater) if entry else None
            if entry is None or lease is None:
                raise NoSuchTaskError(f"task {task_id} is not yours to judge (or is done)")
            if lease.expires <= now:
                if not entry.task.gold and entry.free_slots(now, besides=rater) <= 0:
                    raise NoSuchTaskError(f"your hold on task {task_id} expired; it is taken")
                lease = replace(lease, expires=now + self._lease_s)
                entry.leases[rater] = lease
            return lease

    def judged(self, rater: str, task_id: int) -> None:
        """`rater`'s judgment of the task is stored: count it, end their lease."""
        with self._lock:
            entry = self._open.get(task_id)
            if entry is None:
                return
            self._drop_lease(entry, rater)
            if rater in entry.judged:
                return
            self._judged_by[rater] = self._judged_by.get(rater, 0) + 1
            if entry.task.gold:
                entry.judged.add(rater)
                return
            self._unstart(entry)
            entry.judged.add(rater)
            if entry.missing <= 0:
                self._close(entry)
            else:
                self._start(entry)

    def skip(self, rater: str, task_id: int) -> None:
        """`rater` passes on a task they hold: stored, and the slot comes free for others."""
        self.lease(rater, task_id)
        record_skip(self._store, task_id, rater)
        with self._lock:
            entry = self._open.get(task_id)
            if entry is not None:
                self._drop_lease(entry, rater)

    def _drop_lease(self, entry: _Open, rater: str) -> None:
        entry.leases.pop(rater, None)
        held = self._holding.get(rater)
        if held is not None:
            held.pop(entry.task.id, None)

    def _close(self, entry: _Open) -> None:
        del self._open[entry.task.id]
        for rater in entry.seen:
            self._seen_open[rater] -= 1
        for rater in entry.leases:
            self._holding[rater].pop(entry.task.id, None)

    # ---- progress ------------------------------------------------------------------------------

    def progress(self, rater: str) -> dict[str, int]:
        """What `rater` judged through the queue, and about how many tasks wait for them (open
        tasks they have not seen; some may be full with others' holds)."""
        with self._lock:
            gold_left = sum(1 for tid in self._gold if rater not in self._open[tid].seen)
            waiting = len(self._open) - len(self._gold) - self._seen_open.get(rater, 0)
            return {"judged": self._judged_by.get(rater, 0), "waiting": waiting + gold_left}

    def __len__(self) -> int:
        """Open tasks (gold tasks included)."""
        with self._lock:
            return len(self._open)
