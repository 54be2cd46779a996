"""The Compare and Rank tabs: several answers to one prompt, judged side by side.

A rater takes the next task from the queue (`serve.rating_desk`: real users' prompts, answered
by the versions the task asks for), or types a prompt of their own; then the answers share a
conversation (like regenerated answers). Either way they are blind: the rater sees labels only,
never which model version wrote what.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from tuneloop.core.records import Account, Comparison, Message, Ranking, Winner
from tuneloop.core.settings import MAX_TASK_ANSWERS
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import JUDGE_PARAMS, ChatService, ChatTurn
from tuneloop.serve.limits import Limits
from tuneloop.serve.rating_desk import RatingDesk, TaskView
from tuneloop.serve.ui_common import (
    GENERATION_CONCURRENCY,
    record,
    shown,
    signed_in,
    start_turn,
    stream_together,
)
from tuneloop.serve.ui_tasks import (
    judge_task,
    next_task,
    progress_markdown,
    prompt_markdown,
    skip_task,
)

MAX_OWN_RANKED = 5  # answers to one's own prompt (tasks may show up to MAX_TASK_ANSWERS)
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


def compare_tab(
    service: ChatService, desk: RatingDesk, principals: Principals, limits: Limits
) -> None:
    """Build the Compare tab inside the current Blocks context: the next task from the queue,
    or two answers to a prompt of one's own."""
    pair = gr.State(None)  # (response id of A, response id of B) of one's own prompt
    task = gr.State(None)  # the id of the task being judged
    with gr.Row(equal_height=True):
        next_button = gr.Button("Next task", variant="primary", scale=0, min_width=130)
        skip = gr.Button("Skip", interactive=False, scale=0, min_width=90)
        progress = gr.Markdown(elem_id="compare-progress")
    question = gr.Markdown(visible=False, elem_id="compare-task-prompt")
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(
            placeholder="Or a prompt of your own, to answer twice", show_label=False, scale=5
        )
        generate = gr.Button("Get two answers", scale=1, min_width=150)
    with gr.Row(equal_height=True):
        boxes = [gr.Textbox(label=label, lines=10, interactive=False) for label in ("A", "B")]
    with gr.Row():
        buttons = [gr.Button(label, interactive=False) for label, _ in VERDICTS]
    status = gr.Markdown()

    def locked(note: str) -> dict[Any, Any]:
        return {
            **{b: gr.update(interactive=False) for b in buttons},
            skip: gr.update(interactive=False),
            status: note,
        }

    def show_task(account: Account, view: TaskView | None, note: str = "") -> dict[Any, Any]:
        shown_now = {progress: progress_markdown(desk.progress(account)), pair: None}
        if view is None:
            return {
                **shown_now,
                **locked(f"{note} No task waits for you now.".strip()),
                question: gr.update(visible=False),
                task: None,
                **{box: "" for box in boxes},
            }
        return {
            **shown_now,
            question: gr.update(value=prompt_markdown(view.prompt), visible=True),
            task: view.task_id,
            **{box: shown(text) for box, text in zip(boxes, view.answers, strict=True)},
            **{b: gr.update(interactive=True) for b in buttons},
            skip: gr.update(interactive=True),
            status: f"{note} Which answer is better?".strip(),
        }

    def on_next(request: gr.Request) -> dict[Any, Any]:
        found = next_task(desk, principals, request, "comparison")
        return show_task(*found) if found else {}

    def on_skip(task_id: int | None, request: gr.Request) -> dict[Any, Any]:
        found = signed_in(principals, request, "rater")
        if found is None or task_id is None or not skip_task(desk, found, task_id):
            return {}
        return show_task(found, desk.next(found, "comparison"), "Skipped.")

    def on_generate(text: str, request: gr.Request) -> Iterator[dict[Any, Any]]:
        account = signed_in(principals, request)
        turns = _start_answers(service, limits, account, text, 2) if account else None
        if turns is None:
            yield {}
            return
        yield {
            **locked("Answering…"),
            **{box: "" for box in boxes},
            pair: None,
            task: None,
            question: gr.update(visible=False),
        }
        texts = ["", ""]
        try:
            for texts in stream_together(turns):
                yield dict(zip(boxes, texts, strict=True))
        except RuntimeError as exc:
            gr.Warning(str(exc))
            yield locked("Generation failed; try again.")
            return
        yield {
            **{box: shown(t) for box, t in zip(boxes, texts, strict=True)},
            pair: (turns[0].id, turns[1].id),
            **{b: gr.update(interactive=True) for b in buttons},
            status: "Which answer is better?",
        }

    def on_verdict(
        winner: Winner, ids: tuple[int, int] | None, task_id: int | None, request: gr.Request
    ) -> dict[Any, Any]:
        account = signed_in(principals, request)
        if account is None:
            return {}
        label = next(label for label, w in VERDICTS if w == winner)
        if task_id is not None:
            row = judge_task(desk, limits, account, task_id, winner=winner)
            if row is None:
                return {}
            return show_task(account, desk.next(account, "comparison"), f"Stored “{label}”.")
        if ids is None:
            gr.Warning("Get two answers first.")
            return {}
        fb = Comparison(ids[0], ids[1], winner, rater_id=account.name)
        row = record(service, limits, account, fb)
        if row is None:
            return {}
        return {
            prompt: "",
            **{box: "" for box in boxes},
            pair: None,
            **locked(f"Stored “{label}” (comparison #{row}). Next prompt?"),
        }

    everything = [prompt, question, *boxes, pair, task, *buttons, skip, status, progress]
    gr.on(
        [generate.click, prompt.submit],
        on_generate,
        [prompt],
        everything,
        concurrency_limit=GENERATION_CONCURRENCY,
    )
    next_button.click(on_next, None, everything)
    skip.click(on_skip, [task], everything)

    def verdict(winner: Winner) -> Any:
        def on_click(
            ids: tuple[int, int] | None, task_id: int | None, request: gr.Request
        ) -> dict[Any, Any]:
            return on_verdict(winner, ids, task_id, request)

        return on_click

    for button, (_, winner) in zip(buttons, VERDICTS, strict=True):
        button.click(verdict(winner), [pair, task], everything)


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


def rank_tab(
    service: ChatService, desk: RatingDesk, principals: Principals, limits: Limits
) -> None:
    """Build the Rank tab inside the current Blocks context: the next ranking task from the
    queue, or several answers to a prompt of one's own."""
    ranked = gr.State(None)  # the response ids shown (one's own prompt), in display order
    task = gr.State(None)  # (id, number of answers) of the task being judged
    with gr.Row(equal_height=True):
        next_button = gr.Button("Next task", variant="primary", scale=0, min_width=130)
        skip = gr.Button("Skip", interactive=False, scale=0, min_width=90)
        progress = gr.Markdown(elem_id="rank-progress")
    question = gr.Markdown(visible=False, elem_id="rank-task-prompt")
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(
            placeholder="Or a prompt of your own, to answer several times",
            show_label=False,
            scale=4,
        )
        k_box = gr.Dropdown(
            list(range(3, MAX_OWN_RANKED + 1)),
            value=DEFAULT_RANKED,
            label="Answers",
            scale=1,
            min_width=100,
        )
        generate = gr.Button("Get answers", scale=1, min_width=130)
    slots, texts, ranks = [], [], []
    for i in range(MAX_TASK_ANSWERS):
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

    def layout(k: int, answers: list[str], ready: bool, note: str) -> dict[Any, Any]:
        return {
            **{slot: gr.update(visible=i < k) for i, slot in enumerate(slots)},
            **{box: answers[i] if i < len(answers) else "" for i, box in enumerate(texts)},
            **{r: gr.update(choices=list(range(1, k + 1)), value=None) for r in ranks},
            save: gr.update(interactive=ready),
            status: note,
        }

    def show_task(account: Account, view: TaskView | None, note: str = "") -> dict[Any, Any]:
        shown_now = {progress: progress_markdown(desk.progress(account)), ranked: None}
        if view is None:
            return {
                **shown_now,
                **layout(DEFAULT_RANKED, [], False, f"{note} No task waits for you now.".strip()),
                question: gr.update(visible=False),
                task: None,
                skip: gr.update(interactive=False),
            }
        k = len(view.answers)
        return {
            **shown_now,
            **layout(k, [shown(a) for a in view.answers], True, f"{note} Rank them.".strip()),
            question: gr.update(value=prompt_markdown(view.prompt), visible=True),
            task: (view.task_id, k),
            skip: gr.update(interactive=True),
        }

    def on_next(request: gr.Request) -> dict[Any, Any]:
        found = next_task(desk, principals, request, "ranking")
        return show_task(*found) if found else {}

    def on_skip(held: tuple[int, int] | None, request: gr.Request) -> dict[Any, Any]:
        found = signed_in(principals, request, "rater")
        if found is None or held is None or not skip_task(desk, found, held[0]):
            return {}
        return show_task(found, desk.next(found, "ranking"), "Skipped.")

    def on_generate(text: str, k: int, request: gr.Request) -> Iterator[dict[Any, Any]]:
        k = int(k)
        account = signed_in(principals, request)
        turns = _start_answers(service, limits, account, text, k) if account else None
        if turns is None:
            yield {}
            return
        yield {
            **layout(k, [], False, "Answering…"),
            ranked: None,
            task: None,
            question: gr.update(visible=False),
            skip: gr.update(interactive=False),
        }
        answers = [""] * k
        try:
            for answers in stream_together(turns):
                yield dict(zip(texts, answers, strict=False))
        except RuntimeError as exc:
            gr.Warning(str(exc))
            yield layout(k, [], False, "Generation failed; try again.")
            return
        yield {
            **layout(k, [shown(a) for a in answers], True, "Rank them: 1 is the best."),
            ranked: [t.id for t in turns],
        }

    def on_save(
        ids: list[int] | None, held: tuple[int, int] | None, request: gr.Request, *given: Any
    ) -> dict[Any, Any]:
        account = signed_in(principals, request)
        if account is None:
            return {}
        if held is None and ids is None:
            gr.Warning("Get answers first.")
            return {}
        try:
            order = rank_order(list(given[: held[1] if held else len(ids)]))  # type: ignore[arg-type]
        except ValueError as exc:
            gr.Warning(str(exc))
            return {status: str(exc)}
        best_first = ", ".join(f"answer {i + 1}" for i in order)
        if held is not None:
            if judge_task(desk, limits, account, held[0], ranking=order) is None:
                return {}
            return show_task(account, desk.next(account, "ranking"), f"Stored ({best_first}).")
        fb = Ranking(tuple(ids[i] for i in order), rater_id=account.name)  # type: ignore[index]
        row = record(service, limits, account, fb)
        if row is None:
            return {}
        note = f"Ranking #{row} stored ({best_first}). Next prompt?"
        return {prompt: "", ranked: None, **layout(len(order), [], False, note)}

    everything = [prompt, question, ranked, task, *slots, *texts, *ranks, save, skip, status]
    everything.append(progress)
    gr.on(
        [generate.click, prompt.submit],
        on_generate,
        [prompt, k_box],
        everything,
        concurrency_limit=GENERATION_CONCURRENCY,
    )
    next_button.click(on_next, None, everything)
    skip.click(on_skip, [task], everything)
    save.click(on_save, [ranked, task, *ranks], everything)
