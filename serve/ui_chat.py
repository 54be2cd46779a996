"""The Chat tab: a streaming multi-turn chat whose answers can be voted on, rated, edited and
regenerated; everything is stored through the chat service."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from tuneloop.core.records import Edit, Message, Rating, Thumbs
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService, ChatTurn
from tuneloop.serve.limits import Limits
from tuneloop.serve.ui_common import (
    CHAT_PARAMS,
    GENERATION_CONCURRENCY,
    record,
    shown,
    signed_in,
    start_turn,
)


@dataclass(frozen=True)
class Answer:
    response_id: int
    version_id: str


@dataclass(frozen=True)
class Conversation:
    """The chat as stored, kept in the session. The chatbot only displays it, so the prompt sent
    to the model never contains what the display adds (version notes, placeholders)."""

    id: int | None = None
    messages: tuple[Message, ...] = ()
    answers: tuple[Answer | None, ...] = ()  # one per message; None for the user's

    def last_answer(self) -> Answer | None:
        return self.answers[-1] if self.answers else None


def _display(conv: Conversation) -> list[dict[str, str]]:
    """Chatbot messages, index for index with `conv.messages` (the like event relies on it)."""
    out = []
    for m, a in zip(conv.messages, conv.answers, strict=True):
        if a is None:
            out.append({"role": m.role, "content": m.content})
        else:
            note = f"<sub>{a.version_id} · answer #{a.response_id}</sub>"
            out.append({"role": "assistant", "content": f"{shown(m.content)}\n\n{note}"})
    return out


def _status(conv: Conversation, text: str = "") -> str:
    answer = conv.last_answer()
    if answer is None:
        return text
    line = (
        f"Last answer #{answer.response_id} by model version **{answer.version_id}** "
        f"(conversation {conv.id})."
    )
    return f"{line} {text}".strip()


def chat_tab(service: ChatService, principals: Principals, limits: Limits) -> None:
    """Build the Chat tab's components and events inside the current Blocks context."""
    conv_state = gr.State(Conversation())
    chatbot = gr.Chatbot(
        label="Chat",
        height=420,
        feedback_options=("Like", "Dislike"),
        placeholder="Ask something. Vote on answers with the thumbs under them.",
    )
    with gr.Row(equal_height=True):
        message = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=5,
            autofocus=True,
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=90)
    with gr.Row():
        regenerate = gr.Button("Regenerate", size="sm", scale=0, min_width=120)
        new_chat = gr.Button("New chat", size="sm", scale=0, min_width=120)
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Rate the last answer", open=False), gr.Row(equal_height=True):
        score = gr.Radio([1, 2, 3, 4, 5], label="Score (5 is best)", scale=2)
        reason = gr.Textbox(label="Reason (optional)", scale=3)
        save_rating = gr.Button("Save rating", scale=1, min_width=110)
    with gr.Accordion("Edit the last answer", open=False):
        edit_text = gr.Textbox(
            label="Your corrected answer (stored as preferred to the model's)", lines=4
        )
        save_edit = gr.Button("Save edit", size="sm")
    with gr.Accordion("Sampling", open=False):
        temperature = gr.Slider(
            0.0,
            2.0,
            value=CHAT_PARAMS.temperature,
            step=0.05,
            label="Temperature (0 always picks the likeliest word)",
        )

    def stream(conv: Conversation, base: Conversation, turn: ChatTurn) -> Iterator[tuple[Any, ...]]:
        """Show `turn` streaming after `base` (its prompt); then the chat is `base` plus the
        answer. `conv` is what stays if the generation fails. While it streams the session holds
        `base`, so votes and ratings never land on an answer that is being replaced."""
        view = _display(base)
        text = ""
        try:
            for chunk in turn:
                text += chunk
                yield [*view, {"role": "assistant", "content": text}], base, gr.skip(), gr.skip()
        except RuntimeError as exc:
            gr.Warning(str(exc))
            yield _display(conv), conv, _status(conv), gr.skip()
            return
        done = Conversation(
            turn.conversation_id,
            (*base.messages, Message("assistant", text)),
            (*base.answers, Answer(turn.id, turn.version_id)),
        )
        yield _display(done), done, _status(done), text

    def params(temp: float | None) -> Any:
        if temp is None or not 0.0 <= float(temp) <= 2.0:
            return CHAT_PARAMS
        return replace(CHAT_PARAMS, temperature=float(temp))

    def on_send(
        text: str, conv: Conversation, temp: float, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        account = signed_in(principals, request)
        if account is None:
            yield (gr.skip(),) * 5
            return
        if not text.strip():
            gr.Warning("Type a message first.")
            yield (gr.skip(),) * 5
            return
        base = Conversation(conv.id, (*conv.messages, Message("user", text)), (*conv.answers, None))
        turn = start_turn(service, limits, account, list(base.messages), params(temp), conv.id)
        if turn is None:
            yield (gr.skip(),) * 5
            return
        yield "", _display(base), base, "Answering…", gr.skip()
        for out in stream(conv, base, turn):
            yield gr.skip(), *out

    def on_regenerate(
        conv: Conversation, temp: float, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        account = signed_in(principals, request)
        if account is None:
            yield (gr.skip(),) * 4
            return
        if conv.last_answer() is None:
            gr.Warning("There is no answer to regenerate yet.")
            yield (gr.skip(),) * 4
            return
        base = Conversation(conv.id, conv.messages[:-1], conv.answers[:-1])
        turn = start_turn(service, limits, account, list(base.messages), params(temp), conv.id)
        if turn is None:
            yield (gr.skip(),) * 4
            return
        yield _display(base), base, "Regenerating…", gr.skip()
        yield from stream(conv, base, turn)

    def on_new_chat() -> tuple[Any, ...]:
        return "", [], Conversation(), "", ""

    def on_like(conv: Conversation, like: gr.LikeData, request: gr.Request) -> Any:
        account = signed_in(principals, request)
        if account is None:
            return gr.skip()
        index = like.index if isinstance(like.index, int) else like.index[0]
        a = conv.answers[index] if 0 <= index < len(conv.answers) else None
        if a is None:
            gr.Warning("Wait until the answer is complete, then vote.")
            return _status(conv)
        if like.liked not in (True, False):
            return _status(conv, "Vote cleared here; the vote already stored stays.")
        value = 1 if like.liked else -1
        row = record(service, limits, account, Thumbs(a.response_id, value, rater_id=account.name))
        if row is None:
            return gr.skip()
        thumb = "up" if value == 1 else "down"
        return _status(conv, f"Thumbs {thumb} stored for answer #{a.response_id}.")

    def on_rate(
        conv: Conversation, value: int | None, why: str, request: gr.Request
    ) -> tuple[Any, ...]:
        account = signed_in(principals, request)
        if account is None:
            return gr.skip(), gr.skip(), gr.skip()
        last = conv.last_answer()
        if last is None:
            gr.Warning("There is no answer to rate yet.")
            return gr.skip(), gr.skip(), gr.skip()
        if value is None:
            gr.Warning("Pick a score from 1 to 5.")
            return gr.skip(), gr.skip(), gr.skip()
        rating = Rating(last.response_id, int(value), why.strip() or None, rater_id=account.name)
        if record(service, limits, account, rating) is None:
            return gr.skip(), gr.skip(), gr.skip()
        note = f"Rating {value}/5 stored for answer #{last.response_id}."
        return _status(conv, note), None, ""

    def on_edit(conv: Conversation, text: str, request: gr.Request) -> Any:
        account = signed_in(principals, request)
        if account is None:
            return gr.skip()
        last = conv.last_answer()
        if last is None:
            gr.Warning("There is no answer to edit yet.")
            return gr.skip()
        if (
            record(service, limits, account, Edit(last.response_id, text, rater_id=account.name))
            is None
        ):
            return gr.skip()
        return _status(conv, f"Edit stored for answer #{last.response_id}.")

    chat_out = [message, chatbot, conv_state, status, edit_text]
    gr.on(
        [message.submit, send.click],
        on_send,
        [message, conv_state, temperature],
        chat_out,
        concurrency_limit=GENERATION_CONCURRENCY,
    )
    regenerate.click(
        on_regenerate,
        [conv_state, temperature],
        chat_out[1:],
        concurrency_limit=GENERATION_CONCURRENCY,
    )
    new_chat.click(on_new_chat, None, chat_out, queue=False)
    chatbot.clear(on_new_chat, None, chat_out, queue=False)  # its trash icon: a new chat too
    chatbot.like(on_like, [conv_state], status)
    save_rating.click(on_rate, [conv_state, score, reason], [status, score, reason])
    save_edit.click(on_edit, [conv_state, edit_text], status)
