"""The one path from a chat request or a rating to the store, shared by the HTTP API and the UI."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass

from tuneloop.core.records import DEFAULT_RATER, Feedback, Message, Response, SamplingParams
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.validation import UnknownResponseError, check_rater_id
from tuneloop.serve.engine import Engine, EngineUnavailableError, Generation

# Answers to be compared or ranked are sampled hotter, so that they differ.
JUDGE_PARAMS = SamplingParams(max_tokens=256, temperature=0.9)


class UnknownConversationError(UnknownResponseError):
    """A request named a conversation this store never handed out."""


class ChatTurn:
    """One answer: iterate for its text (`for`, or `astream` on an event loop). When the text
    ends the response is queued for the store under `id`, which the stream carried from its
    first chunk; `saved` resolves once it is committed.

    A stream may end before that commit: any feedback on the response is queued after it in the
    same single writer, so it can never be refused as naming an unknown id. `text()` waits for
    the commit.
    """

    def __init__(
        self,
        store: FeedbackStore,
        generation: Generation,
        conversation_id: int,
        prompt: list[Message],
        params: SamplingParams,
        rater_id: str,
    ) -> None:
        self.id = store.new_response_id()
        self.conversation_id = conversation_id
        self.version_id = generation.version_id
        self.created = int(time.time())
        self.response: Response | None = None
        self.saved: Future | None = None
        self._store = store
        self._generation = generation
        self._prompt = tuple(prompt)
        self._params = params
        self._rater_id = rater_id
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        parts: list[str] = []
        for chunk in self._generation:
            parts.append(chunk)
            yield chunk
        self._save(parts)

    async def astream(self, merge_s: float = 0.0) -> AsyncIterator[str]:
        """Like iterating, on an event loop; see `Generation.achunks` for `merge_s`."""
        parts: list[str] = []
        async with aclosing(self._generation.achunks(merge_s)) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                yield chunk
        self._save(parts)

    def _save(self, parts: list[str]) -> None:
        g = self._generation
        response = Response(
            id=self.id,
            conversation_id=self.conversation_id,
            prompt=self._prompt,
            text="".join(parts),
            model_version_id=g.version_id,
            params=self._params,
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            latency_ms=(time.perf_counter() - self._started) * 1000,
            finish_reason=g.finish_reason,
            rater_id=self._rater_id,
        )
        self.saved = self._store.submit_response(response)
        self.saved.add_done_callback(_report_failed_write)
        self.response = response

    def text(self) -> str:
        """Run the turn to its end; the stored answer's text, once committed."""
        text = "".join(self)
        self.saved.result()  # type: ignore[union-attr]
        return text

    def cancel(self) -> None:
        self._generation.cancel()


def _report_failed_write(saved: Future) -> None:
    """A streamed answer has no one waiting for its write: say so when it fails."""
    if not saved.cancelled() and saved.exception() is not None:
        print(f"[tuneloop] an answer was not stored: {saved.exception()!r}", flush=True)


@dataclass(frozen=True)
class CanaryRoute:
    """A second engine, serving a candidate to `share` of conversations (`serve.canary`)."""

    engine: Engine
    share: float


def in_share(conversation_id: int, share: float) -> bool:
    """Whether a conversation is among `share` of them: a multiplicative hash of its id, so a
    conversation stays with one version, and consecutive ids spread evenly."""
    return (conversation_id * 2654435761) % 2**32 < share * 2**32


class ChatService:
    def __init__(self, engine: Engine, store: FeedbackStore) -> None:
        self.engine = engine
        self.store = store
        self.canary: CanaryRoute | None = None

    @property
    def version(self) -> str:
        return self.engine.version

    @property
    def canary_version(self) -> str | None:
        canary = self.canary
        return canary.engine.version if canary is not None else None

    def engine_for(self, conversation_id: int, version: str | None = None) -> Engine:
        """The engine that answers this conversation: the canary's for its share of them, else
        the served one; or the one serving `version` (EngineUnavailableError if neither)."""
        canary = self.canary
        if version is None:
            if canary is not None and in_share(conversation_id, canary.share):
                return canary.engine
            return self.engine
        for engine in (self.engine, canary.engine if canary else None):
            if engine is not None and engine.version == version:
                return engine
        raise EngineUnavailableError(f"{version} is not served any more")

    def chat(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        conversation_id: int | None = None,
        rater_id: str = DEFAULT_RATER,
        version: str | None = None,
    ) -> ChatTurn:
        """Start an answer to `messages` (the whole conversation so far, last turn the user's),
        from the engine `engine_for` picks."""
        check_rater_id(rater_id)
        if conversation_id is None:
            conversation_id = self.store.new_conversation_id(rater_id)
        elif self.store.conversation_owner(conversation_id) != rater_id:
            # Someone else's conversation is as unknown to the caller as one never started.
            raise UnknownConversationError(f"unknown conversation id: {conversation_id}")
        generation = self.engine_for(conversation_id, version).stream(messages, params)
        return ChatTurn(self.store, generation, conversation_id, messages, params, rater_id)

    def submit_feedback(self, fb: Feedback, *, own_answers_only: bool = False) -> Future:
        return self.store.submit_feedback(fb, own_answers_only=own_answers_only)

    def record_feedback(self, fb: Feedback, *, own_answers_only: bool = False) -> int:
        return self.submit_feedback(fb, own_answers_only=own_answers_only).result()

    def feedback_counts(self, rater: str | None = None) -> dict[str, int]:
        return self.store.feedback_counts(rater)
