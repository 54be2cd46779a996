"""The DuckDB feedback store: migrations, acknowledged writes, validation, batching."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from tuneloop.core.records import (
    Comparison,
    Edit,
    Message,
    Ranking,
    Rating,
    Response,
    SamplingParams,
    Thumbs,
)
from tuneloop.feedback.migrations import MIGRATIONS
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.validation import FeedbackError, NotYoursError, UnknownResponseError


def make_response(
    store: FeedbackStore,
    prompt: str = "What is a list?",
    text: str = "An answer",
    conversation_id: int | None = None,
    history: tuple[Message, ...] = (),
) -> Response:
    r = Response(
        id=store.new_response_id(),
        conversation_id=conversation_id or store.new_conversation_id(),
        prompt=(*history, Message("user", prompt)),
        text=text,
        model_version_id="policy-v1",
        params=SamplingParams(64, 0.7, 1.0),
        prompt_tokens=12,
        completion_tokens=5,
        latency_ms=30.0,
    )
    store.submit_response(r).result()
    return r


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    db = tmp_path / "f.duckdb"
    with FeedbackStore(db) as s:
        assert s.applied_migrations == [name for name, _ in MIGRATIONS]
    with FeedbackStore(db) as s:
        assert s.applied_migrations == []
        names = [r["name"] for r in s.read("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]


def test_every_kind_is_written_with_its_fields(store: FeedbackStore) -> None:
    a = make_response(store, text="first")
    b = make_response(store, text="second")
    c = make_response(store, text="third")
    ids = {
        "thumbs": store.record_feedback(Thumbs(a.id, -1, "alice")),
        "rating": store.record_feedback(Rating(a.id, 4, "clear", "alice")),
        "edit": store.record_feedback(Edit(a.id, "a better first")),
        "comparison": store.record_feedback(Comparison(a.id, b.id, "b", "bob")),
        "ranking": store.record_feedback(Ranking((c.id, a.id, b.id), "bob")),
    }
    assert all(v == 1 for v in ids.values())
    assert store.read("SELECT value, rater_id FROM thumbs") == [{"value": -1, "rater_id": "alice"}]
    assert store.read("SELECT score, reason FROM ratings") == [{"score": 4, "reason": "clear"}]
    assert store.read("SELECT text FROM edits") == [{"text": "a better first"}]
    assert store.read("SELECT response_a, response_b, winner FROM comparisons") == [
        {"response_a": a.id, "response_b": b.id, "winner": "b"}
    ]
    assert store.read("SELECT response_ids FROM rankings") == [{"response_ids": [c.id, a.id, b.id]}]
    roles = {r["id"]: r["role"] for r in store.read("SELECT id, role FROM raters")}
    assert roles == {"anonymous": "user", "alice": "user", "bob": "rater"}
    counts = store.feedback_counts()
    assert counts == {
        "thumbs": 1,
        "rating": 1,
        "edit": 1,
        "comparison": 1,
        "ranking": 1,
        "responses": 3,
        "conversations": 3,
    }


def test_response_records_version_params_and_transcript(store: FeedbackStore) -> None:
    first = make_response(store, prompt="hi", text="hello")
    history = (Message("user", "hi"), Message("assistant", "hello"))
    second = make_response(
        store,
        prompt="and then?",
        text="more",
        conversation_id=first.conversation_id,
        history=history,
    )
    row = store.response(second.id)
    assert row["model_version_id"] == "policy-v1"
    assert '"max_tokens": 64' in row["params"]
    transcript = store.read(
        "SELECT idx, role, content, response_id FROM messages "
        "WHERE conversation_id = ? ORDER BY idx",
        [first.conversation_id],
    )
    assert [(m["idx"], m["role"], m["content"], m["response_id"]) for m in transcript] == [
        (0, "user", "hi", None),
        (1, "assistant", "hello", first.id),
        (2, "user", "and then?", None),
        (3, "assistant", "more", second.id),
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        (Thumbs(1, 0), "thumbs value must be 1 or -1"),
        (Rating(1, 6), "from 1 to 5"),
        (Rating(1, 3, "x" * 5000), "reason is 5000 characters"),
        (Thumbs(1, True), "thumbs value must be 1 or -1, got True"),
        (Edit(1, ""), "edit text is empty: an edit is the answer as it should read"),
        (Edit(1, "   "), "edit text is empty"),
        (Edit(1, None), "edit text is empty"),
        (Edit(1, "x" * 40_000), "the limit is 32000"),
        (Comparison(1, 1, "a"), "two different responses"),
        (Comparison(1, 2, "c"), "winner must be one of"),
        (Ranking((1,)), "2 to 16 responses"),
        (Ranking((1, 2, 1)), "each response once"),
        (Thumbs(1, 1, "bad rater!"), "rater must be"),
    ],
)
def test_bad_feedback_gets_a_clear_error_and_writes_nothing(
    store: FeedbackStore, bad: object, message: str
) -> None:
    make_response(store)
    make_response(store)
    with pytest.raises(FeedbackError, match=message):
        store.record_feedback(bad)
    assert (
        sum(
            v for k, v in store.feedback_counts().items() if k not in ("responses", "conversations")
        )
        == 0
    )


def test_unknown_and_mismatched_responses_are_refused(store: FeedbackStore) -> None:
    a = make_response(store, prompt="one prompt")
    b = make_response(store, prompt="another prompt")
    with pytest.raises(UnknownResponseError, match="unknown response id.*999"):
        store.record_feedback(Thumbs(999, 1))
    with pytest.raises(FeedbackError, match="same prompt"):
        store.record_feedback(Comparison(a.id, b.id, "a"))


@pytest.mark.parametrize("cache_size", [0, 1])
def test_same_prompt_check_holds_when_prompt_hashes_fall_out_of_the_cache(
    tmp_path: Path, cache_size: int
) -> None:
    with FeedbackStore(tmp_path / "f.duckdb", prompt_hash_cache=cache_size) as s:
        a, b = make_response(s, prompt="same"), make_response(s, prompt="same")
        other = make_response(s, prompt="different")
        assert s.record_feedback(Comparison(a.id, b.id, "a")) == 1
        with pytest.raises(FeedbackError, match="same prompt"):
            s.record_feedback(Comparison(a.id, other.id, "b"))
        assert s.record_feedback(Comparison(b.id, a.id, "tie", "ben")) == 2


@pytest.mark.parametrize("cache_size", [0, 200_000])
def test_own_answers_only_refuses_answers_given_to_someone_else(
    tmp_path: Path, cache_size: int
) -> None:
    with FeedbackStore(tmp_path / "f.duckdb", prompt_hash_cache=cache_size) as s:
        mine = replace(make_response(s, prompt="same"), id=s.new_response_id(), rater_id="ann")
        s.submit_response(mine).result()
        theirs = replace(mine, id=s.new_response_id(), rater_id="ben")
        s.submit_response(theirs).result()
        thumb = s.submit_feedback(Thumbs(mine.id, 1, "ann"), own_answers_only=True).result()
        got = s.read("SELECT response_id, value, rater_id FROM thumbs WHERE id = ?", [thumb])
        assert got == [{"response_id": mine.id, "value": 1, "rater_id": "ann"}]
        with pytest.raises(NotYoursError, match="ann may judge only the answers given to ann"):
            s.submit_feedback(Thumbs(theirs.id, 1, "ann"), own_answers_only=True).result()
        pair = Comparison(mine.id, theirs.id, "a", "ann")
        with pytest.raises(NotYoursError):
            s.submit_feedback(pair, own_answers_only=True).result()
        compared = s.submit_feedback(pair).result()  # a rater's: anyone's answers
        sql = "SELECT response_a, response_b, winner FROM comparisons WHERE id = ?"
        assert s.read(sql, [compared]) == [
            {"response_a": mine.id, "response_b": theirs.id, "winner": "a"}
        ]
        assert s.feedback_counts()["thumbs"] == 1 and s.feedback_counts()["comparison"] == 1


def test_conversations_remember_their_owner_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "f.duckdb"
    with FeedbackStore(db) as s:
        cid = s.new_conversation_id("ann")
        assert s.conversation_owner(cid) == "ann"
        r = replace(make_response(s), id=s.new_response_id(), conversation_id=cid, rater_id="ann")
        s.submit_response(r).result()
        assert s.conversation_owner(10**6) is None
    with FeedbackStore(db) as s:
        assert s.conversation_owner(cid) == "ann"


def test_out_of_range_ids_are_refused_before_the_writer_and_the_rest_commit(
    store: FeedbackStore,
) -> None:
    a = make_response(store)
    for bad in (10**30, 2**63, 0, -1):
        with pytest.raises(FeedbackError, match="a response id is an integer from 1 to"):
            store.submit_feedback(Thumbs(bad, 1))
    with pytest.raises(FeedbackError, match="response id"):
        store.submit_feedback(Ranking((a.id, 2**70)))
    futures = [
        store.submit_feedback(Rating(a.id, 1 + i % 5, rater_id=f"r{i}")) for i in range(1000)
    ]
    assert sorted(f.result() for f in futures) == list(range(1, 1001))
    assert store.writing


def test_a_cancelled_waiter_does_not_stop_the_writer(store: FeedbackStore) -> None:
    a = make_response(store)
    gate = threading.Event()
    store._enqueue(lambda con: gate.wait(10))  # hold the writer while the waiter gives up
    waiting = [store.submit_feedback(Thumbs(a.id, 1)) for _ in range(5)]
    assert all(f.cancel() for f in waiting)
    gate.set()
    assert store.submit_feedback(Thumbs(a.id, -1)).result(timeout=10) >= 1
    assert store.writing
    store.close()
    assert not store.writing


def test_one_bad_item_in_a_batch_does_not_fail_the_others(store: FeedbackStore) -> None:
    a = make_response(store)
    futures = [
        store.submit_feedback(Thumbs(a.id if i % 10 else 12345, 1, f"r{i}")) for i in range(200)
    ]
    ok = [f for f in futures if f.exception() is None]
    failed = [f for f in futures if f.exception() is not None]
    assert len(failed) == 20 and all(
        isinstance(f.exception(), UnknownResponseError) for f in failed
    )
    assert store.feedback_counts()["thumbs"] == len(ok) == 180
    assert sorted(f.result() for f in ok) == list(range(1, 181))


def test_concurrent_writers_get_unique_ids_and_all_rows_land(store: FeedbackStore) -> None:
    a = make_response(store)

    def write(i: int) -> int:
        return store.record_feedback(Rating(a.id, 1 + i % 5, rater_id=f"r{i}"))

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(write, range(2000)))
    assert sorted(ids) == list(range(1, 2001))
    assert store.feedback_counts()["rating"] == 2000


def test_acknowledged_writes_are_on_disk_after_close_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "f.duckdb"
    with FeedbackStore(db) as s:
        a = make_response(s)
        acked = [s.record_feedback(Thumbs(a.id, 1, f"r{i}")) for i in range(50)]
    with FeedbackStore(db) as s:
        assert s.feedback_counts()["thumbs"] == len(acked)
        assert s.new_response_id() == a.id + 1  # counters continue after the stored ids


def test_known_raters_and_conversations_can_write_again_after_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "f.duckdb"
    with FeedbackStore(db) as s:
        first = make_response(s)
    with FeedbackStore(db) as s:
        history = (Message("user", "What is a list?"), Message("assistant", "An answer"))
        again = make_response(s, conversation_id=first.conversation_id, history=history)
        assert s.record_feedback(Thumbs(first.id, 1)) == 1
        assert s.record_feedback(Rating(again.id, 4)) == 1
        assert s.read("SELECT count(*) AS n FROM raters")[0]["n"] == 1
        assert s.read("SELECT count(*) AS n FROM conversations")[0]["n"] == 1


def test_a_chat_continues_a_conversation_written_by_another_writer(store: FeedbackStore) -> None:
    """A new chat's first answer is stored without a lookup; a conversation the importer wrote
    (its own messages, through `write`) is looked up, so its turns are not stored twice."""
    cid = store.reserve_conversation_id()
    store.write(
        lambda con: con.execute(
            "INSERT INTO conversations (id, rater_id, created_at) VALUES (?, 'import', now())",
            [cid],
        )
    )
    store.write(
        lambda con: con.execute(
            "INSERT INTO messages (conversation_id, idx, role, content, created_at) "
            "VALUES (?, 0, 'user', 'hi', now()), (?, 1, 'assistant', 'hello', now())",
            [cid, cid],
        )
    )
    history = (Message("user", "hi"), Message("assistant", "hello"))
    make_response(store, prompt="and then?", text="more", conversation_id=cid, history=history)
    fresh = make_response(store, prompt="new", text="chat")
    rows = store.read(
        "SELECT conversation_id, idx, role FROM messages ORDER BY conversation_id, idx"
    )
    assert [(r["conversation_id"], r["idx"], r["role"]) for r in rows] == [
        (cid, 0, "user"),
        (cid, 1, "assistant"),
        (cid, 2, "user"),
        (cid, 3, "assistant"),
        (fresh.conversation_id, 0, "user"),
        (fresh.conversation_id, 1, "assistant"),
    ]


def test_a_second_process_gets_a_clear_lock_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    db = tmp_path / "f.duckdb"
    with FeedbackStore(db):
        code = (
            "from tuneloop.feedback.store import FeedbackStore as S, StoreLockedError as E\n"
            f"try:\n    S({str(db)!r})\nexcept E as e:\n    print('LOCKED', e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        ).stdout
    assert "LOCKED" in out and "tuneloop up" in out


def test_readers_see_only_committed_rows_while_writing(store: FeedbackStore) -> None:
    a = make_response(store)
    stop = threading.Event()
    seen: list[int] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(store.feedback_counts()["thumbs"])

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(300):
        store.record_feedback(Thumbs(a.id, 1))
    stop.set()
    reader.join()
    assert seen == sorted(seen) and seen[-1] <= 300


def test_after_a_burst_the_writer_waits_for_more_writes_but_no_longer_than_its_cap(
    tmp_path: Path,
) -> None:
    """A gap wait of 30 s would hang the lone write below; `max_linger_s` bounds it."""
    with FeedbackStore(tmp_path / "f.duckdb", linger_s=30.0, max_linger_s=0.1) as store:
        a = make_response(store)
        release = threading.Event()
        blocked = threading.Thread(target=store.write, args=(lambda con: release.wait(10),))
        blocked.start()
        burst = [store.submit_feedback(Thumbs(a.id, 1, f"r{i}")) for i in range(50)]  # queued
        release.set()
        blocked.join()
        assert len({f.result(timeout=5) for f in burst}) == 50  # one batch: the writer lingers
        lone = store.submit_feedback(Rating(a.id, 4))
        assert lone.result(timeout=5) == 1
        assert store.feedback_counts()["thumbs"] == 50


def test_one_vote_per_rater_and_item_a_repeat_replaces_it(tmp_path: Path) -> None:
    db = tmp_path / "f.duckdb"
    with FeedbackStore(db) as store:
        a, b = make_response(store, prompt="same"), make_response(store, prompt="same")
        first = store.record_feedback(Thumbs(a.id, 1, "ann"))
        assert store.record_feedback(Thumbs(a.id, -1, "ann")) == first  # the same row
        assert store.record_feedback(Thumbs(a.id, 1, "ben")) != first  # another rater's
        pair = store.record_feedback(Comparison(a.id, b.id, "a", "ann"))
        # The same two answers the other way round are the same item; in one batch, the last
        # of several votes on one item wins, and all are told its row.
        again = [store.submit_feedback(Comparison(b.id, a.id, w, "ann")) for w in "ab" * 20]
        assert {f.result() for f in again} == {pair}
        ranked = store.record_feedback(Ranking((a.id, b.id), "ann"))
        assert store.record_feedback(Ranking((b.id, a.id), "ann")) == ranked
        assert store.read("SELECT count(*) AS n, min(value) AS v FROM thumbs") == [
            {"n": 2, "v": -1}
        ]
        assert store.read("SELECT response_a, winner FROM comparisons") == [
            {"response_a": b.id, "winner": "b"}
        ]
        assert store.read("SELECT response_ids FROM rankings") == [{"response_ids": [b.id, a.id]}]
    with FeedbackStore(db) as store:  # after a restart, from the database's index
        assert store.record_feedback(Thumbs(a.id, 1, "ann")) == first
        assert store.feedback_counts()["thumbs"] == 2


def test_votes_cast_twice_before_the_rule_keep_the_newest(tmp_path: Path) -> None:
    """The migration to one vote per rater and item keeps each rater's newest vote."""
    import duckdb

    from tuneloop.feedback.migrations import apply_migrations

    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    con.execute("CREATE TABLE schema_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ)")
    for name, sql in MIGRATIONS[:3]:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [name])
    con.execute(
        "INSERT INTO comparisons VALUES (1, 1, 2, 'a', 'ann', now()), (2, 2, 1, 'a', 'ann', now()),"
        " (3, 1, 2, 'tie', 'ben', now())"
    )
    assert apply_migrations(con) == [
        "0004_vote_items",
        "0005_one_vote_per_rater_and_item",
        "0006_rating_tasks_and_quarantine",
        "0007_canaries",
        "0008_blind_judgments_and_trusted_accounts",
        "0009_task_scores",
    ]
    assert con.execute("SELECT id, item FROM comparisons ORDER BY id").fetchall() == [
        (2, "1,2"),
        (3, "1,2"),
    ]
    con.close()
