"""The feedback store: one DuckDB file, one writer thread, group commits.

DuckDB lets one process open a file read-write, and a commit per row tops out near 550 rows/s on
two cores. So every write goes through a queue to a single writer thread, which takes everything
waiting, writes it in one transaction (one `INSERT ... SELECT unnest(...)` per table), commits,
and only then resolves the callers' futures: a write is acknowledged after its commit, and under
load many writes share one commit. Readers use their own cursors and see committed data only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from tuneloop.core.records import (
    DEFAULT_RATER,
    FEEDBACK_KINDS,
    Comparison,
    Edit,
    Feedback,
    Ranking,
    Rating,
    Response,
    Thumbs,
    messages_to_json,
    prompt_hash,
)
from tuneloop.feedback.migrations import apply_migrations
from tuneloop.feedback.validation import (
    FeedbackError,
    NotYoursError,
    UnknownResponseError,
    check_feedback,
    referenced_responses,
    vote_item,
)

T = TypeVar("T")
FEEDBACK_TABLES = {
    "thumbs": "thumbs",
    "rating": "ratings",
    "edit": "edits",
    "comparison": "comparisons",
    "ranking": "rankings",
}
_ID_TABLES = ("conversations", "responses", *FEEDBACK_TABLES.values())
_VOTE_TABLES = frozenset(FEEDBACK_TABLES.values())  # one vote per (rater_id, item)
_STOP = object()


class StoreLockedError(RuntimeError):
    """Another process holds the database file (DuckDB allows one read-write process)."""


@dataclass
class _Pending:
    """What one batch will write, and the cache updates to apply once it commits."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    raters: dict[str, str] = field(default_factory=dict)
    conversations: set[int] = field(default_factory=set)
    conv_len: dict[int, int] = field(default_factory=dict)
    # Response id -> (prompt hash, owner) of the responses this batch writes or looked up.
    facts: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Batch position -> (table, rater, item) of each vote, for the ids of votes that replace.
    votes: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    may_exist: set[str] = field(default_factory=set)  # tables whose rows may be there already


class FeedbackStore:
    """Owns the DuckDB file for this process. Thread-safe; close() when done."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_batch: int = 2048,
        prompt_hash_cache: int = 200_000,
        linger_s: float = 0.001,
        max_linger_s: float = 0.004,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreLockedError(
                    f"{self.path} is held by another process (is `tuneloop up` running on this "
                    "data dir? use its API, or stop it first)"
                ) from exc
            raise
        self.applied_migrations = apply_migrations(self._con)
        self._max_batch = max_batch
        self._linger_s, self._max_linger_s = linger_s, max_linger_s
        self._prompt_hash_cache = prompt_hash_cache
        self._id_lock = threading.Lock()
        self._next_id = {
            t: _scalar(self._con, f"SELECT coalesce(max(id), 0) + 1 FROM {t}") for t in _ID_TABLES
        }
        self._known_raters: set[str] = set()
        self._known_conversations: set[int] = set()
        self._owners: dict[int, str] = {}  # conversation id -> its rater, as far as looked up
        self._conv_len: dict[int, int] = {}
        # Response id -> (prompt hash, owner) of recent responses, for feedback checks without
        # a SELECT. Writer thread only; insertion-ordered, so the oldest go first when it is full.
        self._facts: dict[int, tuple[str, str]] = {}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._writer = threading.Thread(
            target=self._run_writer, name="tuneloop-writer", daemon=True
        )
        self._closed = False
        self._writer.start()

    # ---- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Finish every queued write, checkpoint and release the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join()
        self._con.execute("CHECKPOINT")
        self._con.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ids ---------------------------------------------------------------------------------

    def _take_id(self, table: str) -> int:
        with self._id_lock:
            value = self._next_id[table]
            self._next_id[table] = value + 1
            return value

    def new_response_id(self) -> int:
        """Reserve the id a response will be stored under (it names the stream before it ends)."""
        return self._take_id("responses")

    def new_conversation_id(self, owner: str = DEFAULT_RATER) -> int:
        """A new chat of `owner`'s: its turns come through `submit_response`, and none is stored
        yet, so its first response is written without looking up what is stored (a scan of
        `messages`, a tenth of the server's CPU under 32 streams)."""
        cid = self._take_id("conversations")
        self._owners[cid] = owner
        self._conv_len[cid] = 0  # a new key: safe beside the writer thread, which reads it
        return cid

    def conversation_owner(self, conversation_id: int) -> str | None:
        """Whose conversation this is: None for an id never handed out or not stored."""
        owner = self._owners.get(conversation_id)
        if owner is None and self.conversation_allocated(conversation_id):
            rows = self.read("SELECT rater_id FROM conversations WHERE id = ?", [conversation_id])
            if rows:
                owner = self._owners[conversation_id] = rows[0]["rater_id"]
        return owner

    def reserve_conversation_id(self) -> int:
        """An id for a conversation the caller writes itself, messages and all (`write`)."""
        return self._take_id("conversations")

    def new_feedback_id(self, kind: str) -> int:
        """Reserve a row id for a feedback kind, for writers that insert through `write`."""
        return self._take_id(FEEDBACK_TABLES[kind])

    def lease_ids(self, table: str, count: int) -> int:
        """A block of `count` ids of `table` ("responses" or "conversations") for another process
        to hand out (a gateway: `tuneloop.serve.gateway_api`); returns the first."""
        if table not in ("responses", "conversations") or not 0 < count <= 100_000:
            raise ValueError(f"cannot lease {count} ids of {table!r}")
        with self._id_lock:
            first = self._next_id[table]
            self._next_id[table] = first + count
            return first

    def new_conversation_of(self, conversation_id: int, owner: str) -> None:
        """A conversation a gateway started under an id leased to it (`lease_ids`): as
        `new_conversation_id` does for this process's own, its owner and its first response
        need no lookup. Ignored for an id not leased yet, or one already known."""
        if self.conversation_allocated(conversation_id) and conversation_id not in self._owners:
            self._owners[conversation_id] = owner
            self._conv_len.setdefault(conversation_id, 0)

    def conversation_allocated(self, conversation_id: int) -> bool:
        """Whether this id was handed out (stored, or in use by a first turn still running)."""
        with self._id_lock:
            return 0 < conversation_id < self._next_id["conversations"]

    # ---- writes ------------------------------------------------------------------------------

    def _enqueue(self, item: Any) -> Future:
        if self._closed:
            raise RuntimeError("the feedback store is closed")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    def submit_response(self, response: Response) -> Future:
        """Queue a response for writing; the future resolves to its id once committed."""
        return self._enqueue(response)

    def submit_feedback(self, fb: Feedback, *, own_answers_only: bool = False) -> Future:
        """Check and queue feedback; the future resolves to the new row's id once committed,
        or raises FeedbackError (unknown response, responses to different prompts; with
        `own_answers_only`, responses given to anyone but `fb.rater_id`: NotYoursError)."""
        check_feedback(fb)
        return self._enqueue(_OwnAnswers(fb) if own_answers_only else fb)

    def record_feedback(self, fb: Feedback) -> int:
        return self.submit_feedback(fb).result()

    def write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run fn(connection) in the writer thread, in its own transaction; return its result."""
        return self._enqueue(fn).result()

    # ---- reads -------------------------------------------------------------------------------

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection of its own for reading, from any thread: sees committed data only."""
        cur = self._con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def read(
        self, sql: str, params: list[Any] | dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        with self.cursor() as cur:
            res = cur.execute(sql, params or [])
            cols = [d[0] for d in res.description]
            return [dict(zip(cols, row, strict=True)) for row in res.fetchall()]

    def feedback_counts(self, rater: str | None = None) -> dict[str, int]:
        """Rows per feedback kind, plus responses and conversations: of `rater` alone if given
        (the answers they were given, the conversations they began)."""
        where = "" if rater is None else " WHERE rater_id = $rater"
        parts = [
            f"SELECT '{kind}', count(*) FROM {table}{where}"
            for kind, table in FEEDBACK_TABLES.items()
        ]
        parts += [
            f"SELECT 'responses', count(*) FROM responses{where}",
            f"SELECT 'conversations', count(*) FROM conversations{where}",
        ]
        params = {} if rater is None else {"rater": rater}
        with self.cursor() as cur:
            rows = cur.execute(" UNION ALL ".join(parts), params).fetchall()
            return {k: int(n) for k, n in rows}

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs: nothing is written without it (`/health` says so)."""
        return self._writer.is_alive() and not self._closed

    def response(self, response_id: int) -> dict[str, Any] | None:
        rows = self.read("SELECT * FROM responses WHERE id = ?", [response_id])
        return rows[0] if rows else None

    # ---- the writer thread -------------------------------------------------------------------

    def _run_writer(self) -> None:
        """Batches writes into commits.

        While writes come in bursts (the last batch held more than one), the writer waits up to
        `linger_s` for each next write, `max_linger_s` in all, before it commits: under load the
        answers to one batch come back as the next burst of writes, and one commit of all of them
        costs little more than one of half. 32 clients: batches of 16 became 31, and 1,250
        writes/s became 1,450-1,680 on a slow machine (bench/RESULTS.md). Writes that come one
        at a time never wait."""
        stop, lingering = False, False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, deadline = [first], time.monotonic() + self._max_linger_s
            while len(batch) < self._max_batch:
                wait = min(self._linger_s, deadline - time.monotonic()) if lingering else 0.0
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            lingering = len(batch) > 1
            records = [(item, fut) for item, fut in batch if not callable(item)]
            if records:
                self._write_records(records)
            for item, fut in batch:
                if callable(item):
                    self._run_call(item, fut)

    def _run_call(self, fn: Callable, fut: Future) -> None:
        try:
            self._con.execute("BEGIN TRANSACTION")
            result = fn(self._con)
            self._con.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._rollback()
            _settle(fut, exc)
        else:
            _settle(fut, result)

    def _rollback(self) -> None:
        with contextlib.suppress(duckdb.Error):  # no transaction was open
            self._con.execute("ROLLBACK")

    def _write_records(self, batch: list[tuple[Any, Future]], *, replace: bool = False) -> None:
        """Write a batch in one transaction. If it fails as a whole, retry each item alone so
        one bad row never fails the others.

        A vote is new almost always, so it is a plain insert; a batch with a repeated vote (the
        unique index on rater and item refuses it) is written again with `replace`, whose
        upsert costs ~2 ms more a statement."""
        pending = _Pending()
        outcomes: list[int | BaseException] = []
        try:
            self._con.execute("BEGIN TRANSACTION")
            outcomes = self._stage(batch, pending)
            for table, rows in pending.rows.items():
                if not rows:
                    continue
                if replace and table in _VOTE_TABLES:
                    ids = self._replace_votes(table, rows)
                    for i, (t, rater, item) in pending.votes.items():
                        if t == table:
                            outcomes[i] = ids[(rater, item)]
                else:
                    self._insert(table, rows, keep_first=table in pending.may_exist)
            self._con.execute("COMMIT")
        except duckdb.ConstraintException:
            self._rollback()
            if not replace:
                self._write_records(batch, replace=True)
                return
            self._write_one_by_one(batch)
            return
        except BaseException as exc:  # noqa: BLE001
            self._rollback()
            if len(batch) > 1:
                for one in batch:
                    self._write_records([one])
            else:
                _settle(batch[0][1], exc)
            return
        self._known_raters.update(pending.raters)
        self._known_conversations.update(pending.conversations)
        self._conv_len.update(pending.conv_len)
        self._remember_facts(pending.facts)
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            _settle(fut, outcome)

    def _write_one_by_one(self, batch: list[tuple[Any, Future]]) -> None:
        for one in batch:
            self._write_records([one])

    def _replace_votes(self, table: str, rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        """Insert votes, replacing a rater's earlier vote on the same item (its row keeps its
        id); returns the row id of every (rater, item)."""
        last = {(row["rater_id"], row["item"]): row for row in rows}  # a repeat in the batch too
        rows = list(last.values())
        cols = list(rows[0])
        select = ", ".join(f"unnest(${i + 1})" for i in range(len(cols)))
        update = ", ".join(
            f"{c} = excluded.{c}" for c in cols if c not in ("id", "rater_id", "item")
        )
        found = self._con.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} "
            f"ON CONFLICT (rater_id, item) DO UPDATE SET {update} RETURNING rater_id, item, id",
            [[row[c] for row in rows] for c in cols],
        ).fetchall()
        return {(rater, item): rid for rater, item, rid in found}

    def _stage(self, batch: list[tuple[Any, Future]], p: _Pending) -> list[int | BaseException]:
        """Check references and turn records into rows; returns an id or an error per item."""
        now = _now()
        facts: dict[int, tuple[str, str]] = {}  # this batch's checks: see `_Pending.facts`
        for item, _ in batch:
            if isinstance(item, Response):
                facts[item.id] = p.facts[item.id] = (prompt_hash(item.prompt), item.rater_id)
        wanted = {
            rid
            for item, _ in batch
            if not isinstance(item, Response)
            for rid in referenced_responses(_feedback(item))
        } - facts.keys()
        facts.update((rid, self._facts[rid]) for rid in wanted if rid in self._facts)
        wanted -= facts.keys()
        if wanted:
            found = self._con.execute(
                "SELECT id, prompt_hash, rater_id FROM responses "
                "WHERE id IN (SELECT unnest(?::BIGINT[]))",
                [sorted(wanted)],
            ).fetchall()
            p.facts.update((rid, (h, owner)) for rid, h, owner in found)
            facts.update(p.facts)
        outcomes: list[int | BaseException] = []
        for item, _ in batch:
            if isinstance(item, Response):
                outcomes.append(self._stage_response(item, p, now))
                continue
            fb = _feedback(item)
            try:
                _check_references(fb, facts, own_answers_only=isinstance(item, _OwnAnswers))
            except FeedbackError as exc:
                outcomes.append(exc)
                continue
            table = FEEDBACK_TABLES[FEEDBACK_KINDS[type(fb)]]
            p.votes[len(outcomes)] = (table, fb.rater_id, vote_item(fb))
            outcomes.append(self._stage_feedback(fb, p, now))
        return outcomes

    def _remember_facts(self, found: dict[int, tuple[str, str]]) -> None:
        self._facts.update(found)
        excess = len(self._facts) - self._prompt_hash_cache
        if excess > 0:
            for rid in list(itertools.islice(self._facts, excess)):
                del self._facts[rid]

    def _stage_rater(self, rater_id: str, role: str, p: _Pending, now: datetime) -> None:
        if rater_id not in self._known_raters and rater_id not in p.raters:
            p.raters[rater_id] = role
            p.rows["raters"].append({"id": rater_id, "role": role, "created_at": now})
            p.may_exist.add("raters")  # known to this process only once it wrote or saw them

    def _stage_response(self, r: Response, p: _Pending, now: datetime) -> int:
        self._stage_rater(r.rater_id, "user", p, now)
        cid = r.conversation_id
        if cid not in self._known_conversations and cid not in p.conversations:
            p.conversations.add(cid)
            p.rows["conversations"].append({"id": cid, "rater_id": r.rater_id, "created_at": now})
            # A chat this process started has no row yet (see `new_conversation_id`). Any other
            # may have one, written before a restart or by the importer: only those pay for
            # ON CONFLICT, which took 2 of the 7 CPU ms of storing a response.
            if self._conv_len.get(cid) != 0:
                p.may_exist.add("conversations")
        stored = p.conv_len.get(cid)
        if stored is None:
            stored = self._conv_len.get(cid)
        if stored is None:
            stored = _scalar(
                self._con,
                "SELECT coalesce(max(idx) + 1, 0) FROM messages WHERE conversation_id = ?",
                [cid],
            )
        for idx, m in enumerate(r.prompt):
            if idx >= stored:
                p.rows["messages"].append(
                    {
                        "conversation_id": cid,
                        "idx": idx,
                        "role": m.role,
                        "content": m.content,
                        "response_id": None,
                        "created_at": now,
                    }
                )
        p.rows["messages"].append(
            {
                "conversation_id": cid,
                "idx": len(r.prompt),
                "role": "assistant",
                "content": r.text,
                "response_id": r.id,
                "created_at": now,
            }
        )
        p.conv_len[cid] = max(stored, len(r.prompt) + 1)
        p.rows["responses"].append(
            {
                "id": r.id,
                "conversation_id": cid,
                "prompt": messages_to_json(r.prompt),
                "prompt_hash": p.facts[r.id][0],
                "text": r.text,
                "model_version_id": r.model_version_id,
                "params": json.dumps(r.params.to_dict()),
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "latency_ms": r.latency_ms,
                "finish_reason": r.finish_reason,
                "rater_id": r.rater_id,
                "created_at": now,
            }
        )
        return r.id

    def _stage_feedback(self, fb: Feedback, p: _Pending, now: datetime) -> int:
        kind = FEEDBACK_KINDS[type(fb)]
        table = FEEDBACK_TABLES[kind]
        self._stage_rater(
            fb.rater_id, "rater" if kind in ("comparison", "ranking") else "user", p, now
        )
        row: dict[str, Any] = {"id": self._take_id(table)}
        if isinstance(fb, Thumbs):
            row.update(response_id=fb.response_id, value=fb.value)
        elif isinstance(fb, Rating):
            row.update(response_id=fb.response_id, score=fb.score, reason=fb.reason)
        elif isinstance(fb, Edit):
            row.update(response_id=fb.response_id, text=fb.text)
        elif isinstance(fb, Comparison):
            row.update(
                response_a=fb.response_a,
                response_b=fb.response_b,
                winner=fb.winner,
                task_id=fb.task_id,
            )
        elif isinstance(fb, Ranking):
            row.update(response_ids=list(fb.response_ids), task_id=fb.task_id)
        row.update(rater_id=fb.rater_id, item=vote_item(fb), created_at=now)
        p.rows[table].append(row)
        return row["id"]

    def _insert(self, table: str, rows: list[dict[str, Any]], *, keep_first: bool) -> None:
        """One statement per table: a list per column, unnested. Fewer DuckDB calls matter
        because each releases the GIL and must win it back from the busy event loop.
        `keep_first`: rows whose key is there already are left alone, not an error."""
        cols = list(rows[0])
        select = ", ".join(f"unnest(${i + 1})" for i in range(len(cols)))
        on_conflict = " ON CONFLICT DO NOTHING" if keep_first else ""
        self._con.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select}{on_conflict}",
            [[row[c] for row in rows] for c in cols],
        )


def _settle(fut: Future, outcome: Any) -> None:
    """Resolve a caller's future with a result or an exception. A caller that stopped waiting
    (its request was cancelled) may have cancelled it: then there is no one to tell, and the
    writer must not die of `InvalidStateError`."""
    try:
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    except InvalidStateError:
        pass


@dataclass(frozen=True)
class _OwnAnswers:
    """Feedback allowed on its rater's own answers only (see `submit_feedback`)."""

    feedback: Feedback


def _feedback(item: Feedback | _OwnAnswers) -> Feedback:
    return item.feedback if isinstance(item, _OwnAnswers) else item


def _check_references(
    fb: Feedback, facts: dict[int, tuple[str, str]], *, own_answers_only: bool
) -> None:
    """The responses `fb` names exist, answer one prompt, and (if asked) are its rater's own."""
    ids = referenced_responses(fb)
    missing = [r for r in ids if r not in facts]
    if missing:
        raise UnknownResponseError(f"unknown response id(s): {', '.join(map(str, missing))}")
    if len({facts[r][0] for r in ids}) > 1:
        raise FeedbackError("the responses compared or ranked must answer the same prompt")
    if own_answers_only and any(facts[r][1] != fb.rater_id for r in ids):
        raise NotYoursError(
            f"{fb.rater_id} may judge only the answers given to {fb.rater_id}; rating anyone's "
            "needs the rater role"
        )


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    """One value; fetchall() so that no result stays open (DuckDB 2 refuses register() then)."""
    return con.execute(sql, params or []).fetchall()[0][0]


def _now() -> datetime:
    return datetime.now(UTC)
