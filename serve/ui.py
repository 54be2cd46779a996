"""The web UI (Gradio), mounted at / by the server: chat, blind comparisons, rankings and an
operator's view. Every answer and every piece of feedback goes through `ChatService`, the same
code the HTTP API runs, so both store exactly the same records."""

from __future__ import annotations

import gradio as gr

from tuneloop.core.records import DEFAULT_RATER
from tuneloop.feedback.validation import FeedbackError, check_rater_id
from tuneloop.loop.control import LoopControl
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.ui_chat import chat_tab
from tuneloop.serve.ui_judge import compare_tab, rank_tab
from tuneloop.serve.ui_operator import operator_tab


def _check_name(rater_id: str) -> str:
    """An error line under the name box, or nothing: what each recording would refuse anyway."""
    try:
        check_rater_id(rater_id)
    except FeedbackError as exc:
        return f"⚠️ {exc}"
    return ""


def build_ui(service: ChatService, control: LoopControl) -> gr.Blocks:
    """The Blocks app; `server.build_app` mounts it next to the API."""
    with gr.Blocks(title="tuneloop") as ui:
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown(
                    "## tuneloop\nA chat assistant that learns from you: your votes, ratings, "
                    "edits, comparisons and rankings train its next version."
                )
            with gr.Column(scale=1, min_width=260):
                rater = gr.Textbox(
                    value=DEFAULT_RATER,
                    label="Your name",
                    info="Recorded with everything you send or judge here.",
                    max_lines=1,
                )
                name_error = gr.Markdown(elem_id="name-error")
        rater.change(_check_name, rater, name_error, queue=False, show_progress="hidden")

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab(service, rater)
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("Two answers to one prompt, shown blind. Which is better?")
                compare_tab(service, rater)
            with gr.Tab("Rank", id="rank"):
                gr.Markdown("Several answers to one prompt: order them from best to worst.")
                rank_tab(service, rater)
            operator_tab(service, control)
    return ui
