"""What the UI tabs share: starting answers and recording feedback through the chat service
(the same code the HTTP API runs), with bad input shown to the person instead of raised."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import gradio as gr

from tuneloop.core.records import Account, Feedback, Message, SamplingParams, role_allows
from tuneloop.feedback.validation import FeedbackError
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService, ChatTurn
from tuneloop.serve.engine import PromptTooLongError
from tuneloop.serve.limits import Limits, RateLimiter, feedback_cost

CHAT_PARAMS = SamplingParams(max_tokens=256, temperature=0.7)
# Events that generate run this many at once (Gradio's default is one per event function).
GENERATION_CONCURRENCY = 8


def start_turn(
    service: ChatService,
    limits: Limits,
    account: Account,
    messages: list[Message],
    params: SamplingParams,
    conversation_id: int | None = None,
) -> ChatTurn | None:
    """Start an answer for `account`; or warn (over its limit, unknown conversation, prompt too
    long) and return None."""
    if not within(limits.chat, account):
        return None
    try:
        return service.chat(
            messages, params, conversation_id=conversation_id, rater_id=account.name
        )
    except (FeedbackError, PromptTooLongError) as exc:
        gr.Warning(str(exc))
        return None


def signed_in(principals: Principals, request: gr.Request, role: str = "user") -> Account | None:
    """The account of this event's session, which must have `role`; or None after telling the
    person why not. The session is the one its cookie names (`serve.sessions`), valid only while
    the token it signed in with still signs in the same enabled account with the same role, and
    within its time limits. Every handler that reads or changes anything asks: a call to
    Gradio's API without a valid session or the role changes nothing."""
    sessions = principals.sessions
    account = sessions.account_of(request) if sessions is not None else None
    if account is None or account.name != getattr(request, "username", None):
        gr.Warning(
            "Sign in again: this session has ended (signed out, timed out, or the account's "
            "token, role or state changed)."
        )
        return None
    if not role_allows(account.role, role):
        gr.Warning(f"{account.name} is a {account.role}; this needs {role}.")
        return None
    return account


def within(limiter: RateLimiter, account: Account, cost: int = 1) -> bool:
    wait = Limits.wait_s(limiter, account, cost)
    if wait > 0:
        gr.Warning(
            f"Over the limit of {limiter.per_minute} {limiter.what} a minute: "
            f"try again in {math.ceil(wait)} s."
        )
    return wait <= 0


def record(service: ChatService, limits: Limits, account: Account, fb: Feedback) -> int | None:
    """Store `account`'s feedback; the row's id, or None after warning the rater what was wrong
    (over its limit, an answer not theirs: in the UI everyone judges the answers given to
    them)."""
    if not within(limits.feedback, account, feedback_cost(fb)):
        return None
    try:
        return service.record_feedback(fb, own_answers_only=True)
    except FeedbackError as exc:
        gr.Warning(str(exc))
        return None


def stream_together(turns: list[ChatTurn]) -> Iterator[list[str]]:
    """All answers' texts so far, after each chunk of any of them.

    The generations already run in parallel; reading them one after the other would show them one
    after the other, so each is read on a thread of its own. Raises the first generation error once
    every answer has ended. If the caller stops reading (the page went away), the generations stop.
    """
    texts = [""] * len(turns)
    events: queue.Queue[tuple[int, str | Exception | None]] = queue.Queue()

    def read(i: int, turn: ChatTurn) -> None:
        try:
            for chunk in turn:
                events.put((i, chunk))
        except Exception as exc:  # noqa: BLE001 - re-raised by the reader below
            events.put((i, exc))
        else:
            events.put((i, None))

    for i, turn in enumerate(turns):
        threading.Thread(target=read, args=(i, turn), daemon=True, name=f"ui-answer-{i}").start()
    running = len(turns)
    error: Exception | None = None
    try:
        while running:
            i, item = events.get()
            if isinstance(item, str):
                texts[i] += item
                yield list(texts)
            else:
                running -= 1
                error = error or item
    finally:
        if running:
            for turn in turns:
                turn.cancel()
    if error is not None:
        raise error


def shown(text: str) -> str:
    """An answer as displayed: a random or untrained model may well say nothing."""
    return text if text.strip() else "(empty answer)"
