"""What the Compare and Rank tabs share for rating tasks (`serve.rating_desk`): fetching the
next task, showing its prompt, and storing a verdict, with problems shown to the rater."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from tuneloop.core.records import Account, Winner
from tuneloop.feedback.tasks import TaskKind
from tuneloop.feedback.validation import FeedbackError
from tuneloop.serve.auth import Principals
from tuneloop.serve.limits import Limits, ranking_cost
from tuneloop.serve.rating_desk import RatingDesk, TaskView
from tuneloop.serve.task_queue import NoSuchTaskError
from tuneloop.serve.ui_common import signed_in, within


def prompt_markdown(prompt: list[dict[str, Any]]) -> str:
    """A task's conversation as the rater reads it: earlier turns quoted, the last one plain."""
    lines = []
    for message in prompt[:-1]:
        text = html.escape(message["content"]).replace("\n", "\n> ")
        lines.append(f"> **{message['role']}:** {text}\n>")
    last = prompt[-1]["content"] if prompt else ""
    lines.append(f"**Prompt:** {html.escape(last)}")
    return "\n".join(lines)


def progress_markdown(progress: dict[str, int]) -> str:
    return (
        f"Tasks judged: **{progress['judged']}** · waiting for you: about **{progress['waiting']}**"
    )


def next_task(
    desk: RatingDesk, principals: Principals, request: gr.Request, kind: TaskKind
) -> tuple[Account, TaskView | None] | None:
    """The signed-in rater and their next task of `kind` (None when none waits); None after
    telling someone without the rater role why not."""
    account = signed_in(principals, request, "rater")
    if account is None:
        return None
    return account, desk.next(account, kind)


def judge_task(
    desk: RatingDesk,
    limits: Limits,
    account: Account,
    task_id: int,
    *,
    winner: Winner | None = None,
    ranking: list[int] | None = None,
) -> int | None:
    """Store a verdict on a task; the vote's row id, or None after warning the rater."""
    if not within(limits.feedback, account, ranking_cost(len(ranking or ()))):
        return None
    try:
        return desk.judge(account, task_id, winner=winner, ranking=ranking).result()
    except (NoSuchTaskError, FeedbackError) as exc:
        gr.Warning(str(exc).strip("'\""))
        return None


def skip_task(desk: RatingDesk, account: Account, task_id: int) -> bool:
    try:
        desk.skip(account, task_id)
    except NoSuchTaskError as exc:
        gr.Warning(str(exc).strip("'\""))
        return False
    return True
