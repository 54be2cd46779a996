"""The Compare and Rank tabs: several answers to one prompt, judged side by side.

The answers to one prompt share a conversation (like regenerated answers) and are blind: the
rater sees labels only, never which model version wrote what.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from tuneloop.core.records import Account, Comparison, Message, Ranking, Winner
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService, ChatTurn
from tuneloop.serve.limits import Limits
from tuneloop.serve.ui_common import (
    GENERATION_CONCURRENCY,
    JUDGE_PARAMS,
    record,
    shown,
    signed_in,
    start_turn,
    stream_together,
)

MAX_RANKED = 5
DEFAULT_RANKED = 3
VERDICTS = (("A better", "a"), ("B better", "b"), ("Tie", "tie"), ("Both bad", "both_bad"))


def _start_answers(
    service: ChatService, limits: Limits, account: Account, prompt: str, k: int
) -> list[ChatTurn] | None:
    """k answers to `prompt` in one conversation, generating in parallel; None after a warning."""
    if not prompt.strip():
        gr.Warning("Type a prompt first.")
        return None
    messages = [Message("user", prompt)]
    first = start_turn(service, limits, account, messages, JUDGE_PARAMS)
    if first is None:
        return None
    turns = [first]
    for _ in range(k - 1):
        turn = start_turn(service, limits, account, messages, JUDGE_PARAMS, first.conversation_id)
        if turn is None:
            for started in turns:
                started.cancel()
            return None
        turns.append(turn)
    return turns


def compare_tab(service: ChatService, principals: Principals, limits: Limits) -> None:
    """Build the Compare tab inside the current Blocks context."""
    pair = gr.State(None)  # (response id of A, response id of B) once both are stored
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder="A prompt to answer twice", show_label=False, scale=5)
        generate = gr.Button("Get two answers", variant="primary", scale=1, min_width=150)
    with gr.Row(equal_height=True):
        boxes = [gr.Textbox(label=label, lines=10, interactive=False) for label in ("A", "B")]
    with gr.Row():
        buttons = [gr.Button(label, interactive=False) for label, _ in VERDICTS]
    status = gr.Markdown()

    outputs = [*boxes, pair, *buttons, status]

    def on_generate(text: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        account = signed_in(principals, request)
        turns = _start_answers(service, limits, account, text, 2) if account else None
        if turns is None:
            yield (gr.skip(),) * len(outputs)
            return
        locked = [gr.update(interactive=False)] * len(buttons)
        yield "", "", None, *locked, "Answering…"
        texts = ["", ""]
        try:
            for texts in stream_together(turns):
                yield *texts, *(gr.skip(),) * (len(outputs) - 2)
        except RuntimeError as exc:
            gr.Warning(str(exc))
            yield gr.skip(), gr.skip(), None, *locked, "Generation failed; try again."
            return
        unlocked = [gr.update(interactive=True)] * len(buttons)
        ids = (turns[0].id, turns[1].id)
        yield *map(shown, texts), ids, *unlocked, "Which answer is better?"

    def on_verdict(
        winner: Winner, ids: tuple[int, int] | None, request: gr.Request
    ) -> tuple[Any, ...]:
        account = signed_in(principals, request)
        if account is None:
            return (gr.skip(),) * (len(outputs) + 1)
        if ids is None:
            gr.Warning("Get two answers first.")
            return (gr.skip(),) * (len(outputs) + 1)
        row = record(
            service, limits, account, Comparison(ids[0], ids[1], winner, rater_id=account.name)
        )
        if row is None:
            return (gr.skip(),) * (len(outputs) + 1)
        label = next(label for label, w in VERDICTS if w == winner)
        locked = [gr.update(interactive=False)] * len(buttons)
        return "", "", "", None, *locked, f"Stored “{label}” (comparison #{row}). Next prompt?"

    gr.on(
        [generate.click, prompt.submit],
        on_generate,
        [prompt],
        outputs,
        concurrency_limit=GENERATION_CONCURRENCY,
    )

    def verdict(winner: Winner) -> Any:
        def on_click(ids: tuple[int, int] | None, request: gr.Request) -> tuple[Any, ...]:
            return on_verdict(winner, ids, request)

        return on_click

    for button, (_, winner) in zip(buttons, VERDICTS, strict=True):
        button.click(verdict(winner), [pair], [prompt, *outputs])


def rank_order(ranks: list[Any]) -> list[int]:
    """The answers' positions, best first, from the rank (1 is best) given to each; raises
    ValueError, with a message for the rater, unless the ranks are 1..k, each used once."""
    k = len(ranks)
    if any(r in (None, "") for r in ranks):
        raise ValueError(f"Give every answer a rank from 1 to {k}.")
    given = [int(r) for r in ranks]
    twice = sorted({r for r in given if given.count(r) > 1})
    missing = sorted(set(range(1, k + 1)) - set(given))
    if twice or missing:
        problems = []
        if twice:
            problems.append(f"rank {', '.join(map(str, twice))} used more than once")
        if missing:
            problems.append(f"rank {', '.join(map(str, missing))} not used")
        raise ValueError(f"Each rank from 1 to {k} must be used once: {'; '.join(problems)}.")
    return sorted(range(k), key=lambda i: given[i])


def rank_tab(service: ChatService, principals: Principals, limits: Limits) -> None:
    """Build the Rank tab inside the current Blocks context."""
    ranked = gr.State(None)  # the response ids shown, in display order, once stored
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(
            placeholder="A prompt to answer several times", show_label=False, scale=4
        )
        k_box = gr.Dropdown(
            list(range(3, MAX_RANKED + 1)),
            value=DEFAULT_RANKED,
            label="Answers",
            scale=1,
            min_width=100,
        )
        generate = gr.Button("Get answers", variant="primary", scale=1, min_width=130)
    slots, texts, ranks = [], [], []
    for i in range(MAX_RANKED):
        with gr.Row(equal_height=True, visible=i < DEFAULT_RANKED) as slot:
            texts.append(gr.Textbox(label=f"Answer {i + 1}", lines=4, interactive=False, scale=5))
            ranks.append(
                gr.Dropdown(
                    list(range(1, DEFAULT_RANKED + 1)),
                    value=None,
                    label="Rank (1 = best)",
                    scale=1,
                    min_width=120,
                )
            )
        slots.append(slot)
    save = gr.Button("Save ranking", variant="primary", interactive=False)
    status = gr.Markdown()
    outputs = [ranked, *slots, *texts, *ranks, save, status]

    def layout(k: int, answers: list[str], ids: list[int] | None, note: Any) -> tuple[Any, ...]:
        return (
            ids,
            *(gr.update(visible=i < k) for i in range(MAX_RANKED)),
            *(answers[i] if i < len(answers) else "" for i in range(MAX_RANKED)),
            *(gr.update(choices=list(range(1, k + 1)), value=None) for _ in range(MAX_RANKED)),
            gr.update(interactive=ids is not None),
            note,
        )

    def on_generate(text: str, k: int, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        k = int(k)
        account = signed_in(principals, request)
        turns = _start_answers(service, limits, account, text, k) if account else None
        if turns is None:
            yield (gr.skip(),) * len(outputs)
            return
        yield layout(k, [], None, "Answering…")
        before = (gr.skip(),) * (1 + MAX_RANKED)  # the answers' texts come next
        after = (gr.skip(),) * (len(outputs) - len(before) - k)
        answers = [""] * k
        try:
            for answers in stream_together(turns):
                yield *before, *answers, *after
        except RuntimeError as exc:
            gr.Warning(str(exc))
            yield layout(k, [], None, "Generation failed; try again.")
            return
        ids = [t.id for t in turns]
        yield layout(k, [shown(a) for a in answers], ids, "Rank them: 1 is the best.")

    save_outputs = [prompt, *outputs]

    def on_save(ids: list[int] | None, k: int, request: gr.Request, *given: Any) -> tuple[Any, ...]:
        account = signed_in(principals, request)
        if account is None:
            return (gr.skip(),) * len(save_outputs)
        if ids is None:
            gr.Warning("Get answers first.")
            return (gr.skip(),) * len(save_outputs)
        try:
            order = rank_order(list(given[: len(ids)]))
        except ValueError as exc:
            gr.Warning(str(exc))
            return *(gr.skip(),) * (len(save_outputs) - 1), str(exc)
        row = record(
            service, limits, account, Ranking(tuple(ids[i] for i in order), rater_id=account.name)
        )
        if row is None:
            return (gr.skip(),) * len(save_outputs)
        best_first = ", ".join(f"answer {i + 1}" for i in order)
        return "", *layout(int(k), [], None, f"Ranking #{row} stored ({best_first}). Next prompt?")

    gr.on(
        [generate.click, prompt.submit],
        on_generate,
        [prompt, k_box],
        outputs,
        concurrency_limit=GENERATION_CONCURRENCY,
    )
    save.click(on_save, [ranked, k_box, *ranks], save_outputs)
