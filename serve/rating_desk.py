"""The raters' workbench behind the API and the UI: next task, judgment, skip, progress; and
the making of tasks from real traffic or an operator's prompts.

A task's answers are stored responses to one prompt. From traffic: the answer a person was
given, plus fresh samples of the served version in the same conversation (like regenerated
answers: forgetting the person forgets them too). From a prompt set: fresh samples only, in a
conversation of the operator who loaded it. Raters see the prompt and the answers in an order
drawn for them, never the versions or ids; a verdict names the answers by position.

Raters are weighed as their judgments come in, not only before a training cycle: every
TRUST_EVERY judgments the desk runs `feedback.raters.apply_trust` (in a thread of its own), so a
rater whose trust weight falls below half is quarantined within a few of their judgments and
gets gold tasks only from then on (`serve.task_queue`); the judgments they would have spent go
to raters in good standing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from tuneloop.core.records import Account, Feedback, Message, Winner, prompt_hash
from tuneloop.core.settings import TaskSettings, TrustSettings
from tuneloop.feedback import raters
from tuneloop.feedback.task_scores import scores_version, task_information
from tuneloop.feedback.tasks import (
    PRIORITY_CANARY,
    PRIORITY_NORMAL,
    NewTask,
    TaskKind,
    add_tasks,
    task_answers,
    traffic_prompts,
)
from tuneloop.feedback.validation import FeedbackError
from tuneloop.serve.chat_service import JUDGE_PARAMS, ChatService, ChatTurn
from tuneloop.serve.task_queue import Lease, TaskQueue

# Answers generated at once while making tasks (the engine batches them).
MAKE_BATCH = 8
# Tasks whose texts are kept in memory for the next raters who fetch them.
TEXTS_CACHED = 4096
# Tasks about to be handed out whose texts are read along with a task's (see `view`).
READ_AHEAD = 64
# Judgments between two weighings of the raters. Weighing reads every shared vote (about 10 ms
# for a few thousand); ten judgments let a rater who votes at random be held after about 15 of
# theirs (`feedback.raters.MIN_VOTES_TO_QUARANTINE`) instead of after the whole round.
TRUST_EVERY = 10


@dataclass(frozen=True)
class _Ask:
    """Answers to make for one task: one per entry of `versions` (None: whichever version
    answers the conversation), added to `ids`."""

    messages: list[Message]
    conversation_id: int | None
    owner: str
    versions: list[str | None]
    ids: list[int]


@dataclass(frozen=True)
class TaskView:
    """A task as its rater sees it."""

    task_id: int
    kind: TaskKind
    prompt: list[dict[str, Any]]  # the conversation so far, the last turn the user's
    answers: list[str]  # in the order drawn for this rater: "A", "B", ... or 1, 2, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "prompt": self.prompt,
            "answers": self.answers,
        }


class RatingDesk:
    def __init__(
        self,
        service: ChatService,
        settings: TaskSettings | None = None,
        trust: TrustSettings | None = None,
    ) -> None:
        self.service = service
        self.settings = settings or TaskSettings()
        self.trust = trust or TrustSettings()
        self._since_weighed = 0  # judgments stored since the raters were last weighed
        self._weighing = False
        self.queue = TaskQueue(
            service.store, gold_every=self.settings.gold_every, selection=self.settings.selection
        )
        self._scores_seen = ""  # `scores_version` the queue's order was last given
        self._lock = threading.Lock()
        # Task id -> (prompt, text by response id) of the tasks fetched last.
        self._texts: OrderedDict[int, tuple[list[dict[str, Any]], dict[int, str]]] = OrderedDict()
        self._reading = False  # a read-ahead runs
        self.follow_scores()

    def reload(self) -> None:
        """Read the tasks again and forget the texts held (after a person was forgotten: their
        prompts and answers leave memory too)."""
        self.queue.reload()
        with self._lock:
            self._texts.clear()
        self._scores_seen = ""
        self.follow_scores()

    def follow_scores(self) -> bool:
        """With the `active` selection, give the queue the tasks' scores again when new ones
        were written (`loop.active`); whether it did."""
        if self.settings.selection != "active":
            return False
        store = self.service.store
        seen = scores_version(store)
        if seen == self._scores_seen:
            return False
        self.queue.apply_information(task_information(store))
        self._scores_seen = seen
        return True

    # ---- raters ------------------------------------------------------------------------------

    def next(self, account: Account, kind: TaskKind | None = None) -> TaskView | None:
        lease = self.queue.next(account.name, kind)
        return self.view(lease) if lease is not None else None

    async def anext(self, account: Account, kind: TaskKind | None = None) -> TaskView | None:
        """`next` on an event loop: the queue and the cache answer on it; the database (a
        task not read ahead) in a worker thread."""
        lease = self.queue.next(account.name, kind)
        if lease is None:
            return None
        cached = self._cached(lease)
        return cached or await run_in_threadpool(self.view, lease)

    def view(self, lease: Lease) -> TaskView:
        cached = self._cached(lease)
        if cached is not None:
            return cached
        found = self._read({lease.task_id: lease.order})
        return self._shown(lease, *found[lease.task_id])

    def _read(self, tasks: dict[int, Sequence[int]]) -> dict[int, Any]:
        found = task_answers(self.service.store, tasks)
        with self._lock:
            self._texts.update(found)
            while len(self._texts) > TEXTS_CACHED:
                self._texts.popitem(last=False)
        return found

    def _cached(self, lease: Lease) -> TaskView | None:
        """The task as shown from memory. A task goes to several raters, and the next tasks
        in line are read ahead, READ_AHEAD in one query, in a thread of their own whenever
        the half of them still to come is not in memory: a query costs ~1 ms however few
        rows it reads, and reading on the fetch's path made its slowest 1 % 5 times slower
        (bench/rating_queue.py)."""
        with self._lock:
            found = self._texts.get(lease.task_id)
            if found is not None:
                self._texts.move_to_end(lease.task_id)
        self._maybe_read_ahead()
        return self._shown(lease, *found) if found is not None else None

    def _maybe_read_ahead(self) -> None:
        coming = self.queue.upcoming(READ_AHEAD)
        with self._lock:
            if self._reading or not coming:
                return
            half = coming[: len(coming) // 2 + 1]
            if all(tid in self._texts for tid, _ in half):
                return
            self._reading = True

        def read() -> None:
            try:
                self._read(dict(coming))
            finally:
                with self._lock:
                    self._reading = False

        threading.Thread(target=read, name="tuneloop-read-ahead", daemon=True).start()

    @staticmethod
    def _shown(lease: Lease, prompt: list[dict[str, Any]], texts: dict[int, str]) -> TaskView:
        return TaskView(lease.task_id, lease.kind, prompt, [texts[rid] for rid in lease.order])

    def judge(
        self,
        account: Account,
        task_id: int,
        *,
        winner: Winner | None = None,
        ranking: list[int] | None = None,
    ) -> Future:
        """Store `account`'s verdict on a task they hold; the future resolves to the vote's
        row id once committed. NoSuchTaskError, or FeedbackError for a verdict that does not
        fit the task, are raised here."""
        lease = self.queue.lease(account.name, task_id)
        saved = self.service.submit_feedback(lease.feedback(winner=winner, ranking=ranking))

        def done(f: Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.queue.judged(account.name, task_id)
                self._maybe_weigh()

        saved.add_done_callback(done)
        return saved

    def quarantine(self, names: list[str], reason: str, *, actor: str) -> list[str]:
        """`feedback.raters.quarantine`, the queue told at once: those held get gold tasks only
        from their next fetch. Returns those newly held."""
        held = raters.quarantine(self.service.store, names, reason, actor=actor)
        self.queue.read_held()
        return held

    def reinstate(self, name: str, *, actor: str) -> bool:
        """`feedback.raters.reinstate`, the queue told at once; whether they were held."""
        freed = raters.reinstate(self.service.store, name, actor=actor)
        self.queue.read_held()
        return freed

    def _maybe_weigh(self) -> None:
        """Every TRUST_EVERY judgments, weigh the raters in a thread (see the module's
        docstring); with `rater_weights` off nobody is quarantined for a weight."""
        if not self.trust.rater_weights:
            return
        with self._lock:
            self._since_weighed += 1
            if self._weighing or self._since_weighed < TRUST_EVERY:
                return
            self._since_weighed, self._weighing = 0, True

        def weigh() -> None:
            try:
                raters.apply_trust(self.service.store, self.trust)
                self.queue.read_held()  # also those the cycle or an operator held since
            finally:
                with self._lock:
                    self._weighing = False

        threading.Thread(target=weigh, name="tuneloop-weigh-raters", daemon=True).start()

    def feedback_on_answer(
        self, account: Account, task_id: int, position: int, make: Callable[[int], Feedback]
    ) -> Future:
        """Store `make(response id)` (a thumbs, rating or edit by `account`) on the answer shown
        at `position` of a task `account` holds: raters judge the answers given to them, which
        they know by position only (the view is blind)."""
        lease = self.queue.lease(account.name, task_id)
        if not 0 <= position < len(lease.order):
            raise FeedbackError(f"task {task_id} shows answers 0 to {len(lease.order) - 1}")
        return self.service.submit_feedback(make(lease.order[position]))

    def skip(self, account: Account, task_id: int) -> None:
        self.queue.skip(account.name, task_id)

    def progress(self, account: Account) -> dict[str, int]:
        return self.queue.progress(account.name)

    # ---- making tasks ------------------------------------------------------------------------

    def make_from_traffic(
        self, limit: int, *, answers: int | None = None, overlap: int | None = None
    ) -> list[int]:
        """Tasks from the newest prompts people asked that no task holds yet: each with the
        answer they were given and `answers - 1` fresh ones. While a canary runs, the fresh
        answers come from the version that did not answer (canary or served), so that each
        task pits one against the other for the human gate, ahead of other tasks. Returns the
        new tasks' ids."""
        answers = answers or self.settings.answers
        overlap = overlap or self.settings.overlap
        found = traffic_prompts(self.service.store, limit)
        canary, served = self.service.canary_version, self.service.version
        asks = []
        for p in found:
            versions: list[str | None] = [None] * (answers - 1)
            given = [p.response_id]
            if canary is not None and p.version_id in (canary, served):
                other = served if p.version_id == canary else canary
                versions = [other if i % 2 == 0 else p.version_id for i in range(answers - 1)]
            elif canary is not None:  # an older version's answer: two fresh ones instead
                given, versions = [], [(canary, served)[i % 2] for i in range(answers)]
            asks.append(_Ask(_messages(p.prompt), p.conversation_id, p.author, versions, given))
        made = self._answer(asks)
        source, priority = ("canary", PRIORITY_CANARY) if canary else ("traffic", PRIORITY_NORMAL)
        new = [
            NewTask(tuple(ids), p.prompt_hash, p.author, source, overlap, priority)
            for p, ids in zip(found, made, strict=True)
        ]
        return self._store(new)

    def make_from_prompts(
        self,
        prompts: list[str],
        owner: Account,
        *,
        answers: int | None = None,
        overlap: int | None = None,
    ) -> list[int]:
        """Tasks from an operator's prompts: `answers` fresh answers each, in conversations of
        `owner`'s (while a canary runs, from it and the served version in turn). Returns the
        new tasks' ids."""
        answers = answers or self.settings.answers
        overlap = overlap or self.settings.overlap
        canary, served = self.service.canary_version, self.service.version
        versions: list[str | None] = [None] * answers
        if canary is not None:
            versions = [(canary, served)[i % 2] for i in range(answers)]
        asks = [
            _Ask([Message("user", p)], None, owner.name, versions, []) for p in prompts if p.strip()
        ]
        made = self._answer(asks)
        source, priority = ("canary", PRIORITY_CANARY) if canary else ("prompts", PRIORITY_NORMAL)
        new = [
            NewTask(tuple(ids), prompt_hash(ask.messages), None, source, overlap, priority)
            for ask, ids in zip(asks, made, strict=True)
        ]
        return self._store(new)

    def _answer(self, asks: list[_Ask]) -> list[list[int]]:
        """Each ask's ids with its fresh answers added, generated `MAKE_BATCH` at a time."""
        made = [list(ask.ids) for ask in asks]
        pending: list[tuple[int, ChatTurn]] = []
        for i, ask in enumerate(asks):
            conversation_id = ask.conversation_id
            for version in ask.versions:
                turn = self.service.chat(
                    ask.messages,
                    JUDGE_PARAMS,
                    conversation_id=conversation_id,
                    rater_id=ask.owner,
                    version=version,
                )
                conversation_id = turn.conversation_id  # the next answers go beside it
                pending.append((i, turn))
                if len(pending) >= MAKE_BATCH:
                    _finish(pending, made)
        _finish(pending, made)
        return made

    def _store(self, new: list[NewTask]) -> list[int]:
        ids = add_tasks(self.service.store, new)
        self.queue.add(ids)
        return ids


def _finish(pending: list[tuple[int, ChatTurn]], made: list[list[int]]) -> None:
    for i, turn in pending:
        turn.text()  # runs to the end and waits for the answer's commit
        made[i].append(turn.id)
    pending.clear()


def _messages(prompt: list[dict[str, Any]]) -> list[Message]:
    return [Message(m["role"], m["content"]) for m in prompt]


class TaskRefill:
    """Keeps `settings.backlog` tasks open, made from new traffic, checking every
    `settings.refill_seconds`, while `settings.from_traffic` or a canary runs: a thread of the
    server, stopped with `close`."""

    def __init__(self, desk: RatingDesk, log: Callable[[str], None]) -> None:
        self._desk = desk
        self._log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuneloop-tasks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        settings = self._desk.settings
        while not self._stop.wait(settings.refill_seconds):
            try:
                self._desk.follow_scores()
            except Exception as exc:  # noqa: BLE001 - the next round reads them again
                self._log(f"reading the tasks' scores failed: {exc!r}")
            if not settings.from_traffic and self._desk.service.canary_version is None:
                continue
            wanted = settings.backlog - len(self._desk.queue)
            if wanted <= 0:
                continue
            try:
                made = self._desk.make_from_traffic(wanted)
            except Exception as exc:  # noqa: BLE001 - the server goes on; the next round retries
                self._log(f"making rating tasks failed: {exc!r}")
                continue
            if made:
                self._log(f"made {len(made)} rating tasks from traffic")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
