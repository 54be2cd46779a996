"""Rating tasks on a real DuckDB file: storing them, handing them out (overlap, never the
author, never twice, order of need, gold), skips across a restart, quarantine leaving the
snapshot, and the leaderboard of versions against a hand-computed case."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import duckdb
import pytest

from tuneloop.core.records import Comparison, Message, Response, SamplingParams, prompt_hash
from tuneloop.core.settings import TrustSettings
from tuneloop.feedback import raters
from tuneloop.feedback.leaderboard import version_battles, version_leaderboard
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.tasks import NewTask, add_tasks, load_tasks, set_gold, task_counts
from tuneloop.feedback.validation import FeedbackError
from tuneloop.serve.task_queue import NoSuchTaskError, TaskQueue

OPEN = TrustSettings(anonymous=True)  # these raters are no accounts


def answer(store: FeedbackStore, prompt: str, version: str = "v1", owner: str = "ann") -> int:
    messages = (Message("user", prompt),)
    r = Response(
        id=store.new_response_id(),
        conversation_id=store.new_conversation_id(owner),
        prompt=messages,
        text=f"{version} says something about {prompt}",
        model_version_id=version,
        params=SamplingParams(),
        prompt_tokens=3,
        completion_tokens=5,
        latency_ms=1.0,
        rater_id=owner,
    )
    store.submit_response(r).result()
    return r.id


def make_tasks(
    store: FeedbackStore, n: int, *, answers: int = 2, overlap: int = 3, author: str = "ann"
) -> list[int]:
    new = []
    for i in range(n):
        prompt = f"question {i}"
        ids = tuple(answer(store, prompt, owner=author) for _ in range(answers))
        new.append(NewTask(ids, prompt_hash([Message("user", prompt)]), author, "traffic", overlap))
    return add_tasks(store, new)


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def judge(store: FeedbackStore, queue: TaskQueue, rater: str, winner: str = "a") -> int | None:
    lease = queue.next(rater)
    if lease is None:
        return None
    fb = (
        lease.feedback(winner=winner)
        if lease.kind == "comparison"
        else lease.feedback(ranking=list(range(len(lease.order))))
    )
    store.submit_feedback(fb).result()
    queue.judged(rater, lease.task_id)
    return lease.task_id


def test_a_task_is_stored_once_for_its_answers_which_must_answer_one_prompt(store) -> None:
    made = make_tasks(store, 2)
    assert len(made) == 2
    task = load_tasks(store)[0]
    again = NewTask(task.response_ids[::-1], task.prompt_hash, "ann", "traffic")
    assert add_tasks(store, [again]) == []  # the same answers: the same item, one task
    other = answer(store, "something else")
    with pytest.raises(FeedbackError, match="answer other prompts"):
        add_tasks(store, [NewTask((task.response_ids[0], other), task.prompt_hash, None, "x")])
    assert task_counts(store) == {"tasks": 2, "done": 0, "open": 2, "gold": 0, "judgments": 0}


def test_each_task_goes_to_overlap_raters_never_its_author_never_twice(store) -> None:
    make_tasks(store, 5, overlap=3, author="ann")
    queue = TaskQueue(store, gold_every=0, seed=1)
    judged: dict[int, list[str]] = {}
    for _ in range(10):
        for rater in ("ann", "bob", "cat", "dan", "eve"):
            tid = judge(store, queue, rater)
            if tid is not None:
                judged.setdefault(tid, []).append(rater)
    assert sorted(judged) == [t.id for t in load_tasks(store, open_only=False)]
    for raters_of_task in judged.values():
        assert len(raters_of_task) == 3 == len(set(raters_of_task))
        assert "ann" not in raters_of_task
    assert len(queue) == 0
    assert task_counts(store)["done"] == 5
    assert queue.progress("bob")["waiting"] == 0


def test_started_tasks_are_finished_before_new_ones_are_begun(store) -> None:
    first, second = make_tasks(store, 2, overlap=2)
    queue = TaskQueue(store, gold_every=0)
    assert judge(store, queue, "bob") == first
    # cat gets the task bob began, not the untouched one.
    assert queue.next("cat").task_id == first


def test_a_held_task_comes_back_until_judged_and_its_slot_is_kept(store) -> None:
    (tid,) = make_tasks(store, 1, overlap=1)
    now = [0.0]
    queue = TaskQueue(store, gold_every=0, lease_s=60, clock=lambda: now[0])
    lease = queue.next("bob")
    assert queue.next("bob") == lease  # a reload of the page shows the same task
    assert queue.next("cat") is None  # the one slot is bob's
    now[0] = 61.0  # bob's hold ran out: cat may take the slot
    assert queue.next("cat").task_id == tid
    with pytest.raises(NoSuchTaskError, match="expired"):
        queue.lease("bob", tid)
    with pytest.raises(NoSuchTaskError):
        queue.lease("dan", tid)


def test_answers_are_shown_in_an_order_drawn_per_rater(store) -> None:
    make_tasks(store, 40, answers=3, overlap=1)
    queue = TaskQueue(store, gold_every=0, seed=3)
    firsts = set()
    for i in range(40):
        lease = queue.next(f"r{i}")
        task = next(t for t in load_tasks(store) if t.id == lease.task_id)
        assert sorted(lease.order) == sorted(task.response_ids)
        firsts.add(task.response_ids.index(lease.order[0]))
    assert firsts == {0, 1, 2}


def test_a_verdict_names_answers_by_position_shown(store) -> None:
    make_tasks(store, 1, answers=3, overlap=1)
    lease = TaskQueue(store, gold_every=0).next("bob")
    ranking = lease.feedback(ranking=[2, 0, 1])
    assert ranking.response_ids == (lease.order[2], lease.order[0], lease.order[1])
    with pytest.raises(FeedbackError, match="every answer shown once"):
        lease.feedback(ranking=[0, 0, 1])
    with pytest.raises(FeedbackError, match="takes a ranking"):
        lease.feedback(winner="a")


def test_skips_are_kept_across_a_restart(store) -> None:
    (tid,) = make_tasks(store, 1)
    queue = TaskQueue(store, gold_every=0)
    queue.next("bob")
    queue.skip("bob", tid)
    assert queue.next("bob") is None
    assert TaskQueue(store, gold_every=0).next("bob") is None  # a new process: still skipped
    assert TaskQueue(store, gold_every=0).next("cat").task_id == tid


def test_gold_tasks_go_to_every_rater_and_score_them(store) -> None:
    tids = make_tasks(store, 3, overlap=1)
    gold = load_tasks(store)[0]
    best = gold.response_ids[0]
    set_gold(store, gold.id, best, actor="otto")
    with pytest.raises(FeedbackError, match="not one of"):
        set_gold(store, gold.id, 10**6, actor="otto")
    queue = TaskQueue(store, gold_every=1)
    for rater, right in (("bob", True), ("cat", False), ("dan", True)):
        lease = queue.next(rater)
        assert lease.task_id == gold.id  # gold first (one fetch in one), to every rater
        winner = "a" if (lease.order[0] == best) == right else "b"
        store.submit_feedback(lease.feedback(winner=winner)).result()
        queue.judged(rater, lease.task_id)
    assert {t for t in tids if t != gold.id} == {
        queue.next("bob").task_id,
        queue.next("cat").task_id,
    }
    report = raters.rater_report(store)
    by_name = {r.name: r for r in report.raters}
    assert (by_name["bob"].gold_correct, by_name["bob"].gold_total) == (1, 1)
    assert by_name["cat"].gold_accuracy == 0.0


def test_a_quarantined_rater_gets_gold_tasks_only_until_reinstated(store) -> None:
    tids = make_tasks(store, 4, overlap=2)
    gold = load_tasks(store)[0]
    set_gold(store, gold.id, gold.response_ids[0], actor="otto")
    queue = TaskQueue(store, gold_every=0)
    raters.quarantine(store, ["cat"], "votes at random", actor="otto")
    assert queue.next("cat").task_id != gold.id  # not read yet: as before
    assert queue.read_held() == frozenset({"cat"})
    queue = TaskQueue(store, gold_every=0)  # a new process reads the quarantine too
    assert judge(store, queue, "cat") == gold.id
    assert queue.next("cat") is None  # no gold left: nothing, though three tasks wait
    assert [judge(store, queue, "bob") for _ in range(4)] == tids[1:] + [gold.id]
    raters.reinstate(store, "cat", actor="otto")
    queue.read_held()
    assert queue.next("cat").task_id == tids[1]


def test_twenty_raters_at_once_never_share_a_slot(store) -> None:
    make_tasks(store, 60, overlap=3, author="nobody")
    queue = TaskQueue(store, gold_every=0)
    errors: list[BaseException] = []

    def work(rater: str) -> None:
        try:
            while judge(store, queue, rater, "a" if hash(rater) % 2 else "b") is not None:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    per_task = store.read("SELECT item, count(*) AS n FROM comparisons GROUP BY item")
    assert len(per_task) == 60 and {r["n"] for r in per_task} == {3}


def test_a_quarantined_raters_rows_leave_the_next_snapshot_until_reinstated(
    store, tmp_path: Path
) -> None:
    a, b = answer(store, "q"), answer(store, "q")
    for rater in ("bob", "cat"):
        store.submit_feedback(Comparison(a, b, "a", rater)).result()
    assert raters.quarantine(store, ["cat"], "random votes", actor="otto") == ["cat"]
    assert raters.quarantine(store, ["cat"], "again", actor="otto") == []

    def snapshot_raters() -> list[str]:
        snap = create_snapshot(store, tmp_path / "snaps", OPEN)
        path = snap.path / snap.manifest["tables"]["comparisons"]["file"]
        with duckdb.connect() as con:
            return [r for (r,) in con.execute(f"SELECT rater_id FROM '{path}'").fetchall()]

    assert snapshot_raters() == ["bob"]
    assert raters.reinstate(store, "cat", actor="otto")
    assert sorted(snapshot_raters()) == ["bob", "cat"]
    actions = [r["action"] for r in store.read("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["rater.quarantine", "rater.reinstate"]


def test_raters_below_the_thresholds_are_found(store) -> None:
    report = raters.RaterReport(
        0.5,
        [
            raters.RaterQuality("good", 50, 0.8, 9, 10, False),
            raters.RaterQuality("noisy", 50, 0.05, 9, 10, False),
            raters.RaterQuality("new", 3, -0.2, 0, 0, False),
            raters.RaterQuality("guesser", 50, 0.6, 2, 10, False),
            raters.RaterQuality("held", 50, 0.0, 0, 10, True),
        ],
        [],
    )
    assert raters.below(report, alpha=0.2) == ["noisy"]
    assert raters.below(report, gold_accuracy=0.5) == ["guesser"]


def test_the_leaderboard_matches_a_hand_computed_case(store) -> None:
    """v2 beats v1 in 3 of 4 comparisons (one of them a tie counted half: 2.5 of 4 would not
    do, so: 3 wins, 1 loss); Bradley-Terry: 400·log10(3) = 190.8 points apart."""
    for i, winner in enumerate(("a", "a", "a", "b")):
        new, old = answer(store, f"p{i}", "v2"), answer(store, f"p{i}", "v1")
        store.submit_feedback(Comparison(new, old, winner, "bob")).result()
    same = [answer(store, "same", "v1") for _ in range(2)]
    store.submit_feedback(Comparison(*same, "a", "bob")).result()  # one version: no battle
    assert len(version_battles(store, OPEN)) == 4
    board = version_leaderboard(store, OPEN, rounds=200)
    assert [s.version for s in board] == ["v2", "v1"]
    assert math.isclose(board[0].rating - board[1].rating, 400 * math.log10(3), abs_tol=1.0)
    assert all(s.lower <= s.rating <= s.upper for s in board)
    raters.quarantine(store, ["bob"], "", actor="otto")
    assert version_leaderboard(store, OPEN, rounds=10) == []  # bob's votes no longer count
    assert json.dumps([s.version for s in board])


def test_simulated_raters_agreement_finds_and_quarantines_the_random_one(store) -> None:
    """Three raters flip 10 % of true verdicts, one answers at random: its alpha is the lowest
    by far, and quarantining those below 0.2 takes it (and only it) out."""
    import random

    rng = random.Random(7)
    make_tasks(store, 150, overlap=4, author="nobody")
    queue = TaskQueue(store, gold_every=0, seed=2)
    truth = {t.id: rng.choice(t.response_ids) for t in load_tasks(store)}  # the better one
    for rater, flip in (("ann", 0.1), ("bob", 0.1), ("cid", 0.1), ("rnd", 0.5)):
        while (lease := queue.next(rater)) is not None:
            right = rng.random() >= flip
            winner = "a" if (lease.order[0] == truth[lease.task_id]) == right else "b"
            store.submit_feedback(lease.feedback(winner=winner)).result()
            queue.judged(rater, lease.task_id)
    report = raters.rater_report(store)
    alpha = {r.name: r.alpha for r in report.raters}
    assert min(alpha, key=alpha.get) == "rnd" and alpha["rnd"] < 0.15
    assert all(alpha[name] > 0.3 for name in ("ann", "bob", "cid"))
    assert raters.below(report, alpha=0.2) == ["rnd"]
    assert {(p.a, p.b) for p in report.pairs} >= {("ann", "bob"), ("bob", "rnd")}


def test_the_human_gates_verdict_by_hand() -> None:
    """9 wins, 1 tie, 2 losses: mean 0.7917, sample sd 0.3965, margin 1.96 * 0.3965 / sqrt(12)
    = 0.2243: [0.567, 1.0]; over the bar of 0.5 once 12 judgments are in."""
    from tuneloop.feedback.canary import verdict

    scores = [1.0] * 9 + [0.5] + [0.0] * 2
    early = verdict(scores, min_judgments=13, min_win_rate=0.5)
    assert early.decision is None and early.judgments == 12
    found = verdict(scores, min_judgments=12, min_win_rate=0.5)
    assert found.decision == "promote"
    assert math.isclose(found.win_rate, 0.79167, abs_tol=1e-4)
    assert math.isclose(found.lower, 0.5673, abs_tol=1e-3) and found.upper == 1.0
    assert verdict(scores, 12, 0.6).decision == "reject"  # the lower bound misses 0.6
    assert verdict([], 1, 0.5).decision is None


def test_a_canary_answers_its_share_of_conversations() -> None:
    from tuneloop.serve.chat_service import in_share

    for share in (0.1, 0.25, 0.5):
        hits = sum(in_share(cid, share) for cid in range(1, 2001))
        assert abs(hits / 2000 - share) <= 0.01
    assert all(in_share(7, 0.1) == in_share(7, 0.1) for _ in range(3))  # sticky
