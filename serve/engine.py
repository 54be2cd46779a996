"""Engines turn a conversation into a stream of text, and swap the weights they serve.

The embedded engine runs transformers in this process (CPU or one GPU). Atomic swap: `load()`
builds the new model beside the old one, then replaces one reference under a lock. A request pins
the reference it found when it started, so it finishes on that version; the old weights are freed
when its last request ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneloop.records import Message, SamplingParams


class PromptTooLongError(ValueError):
    """The prompt leaves no room for an answer in the model's context window."""


class Generation(Protocol):
    """One answer being generated. Iterate for text chunks; stats are final after the end."""

    version_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    @property
    def version(self) -> str: ...

    def stream(self, messages: list[Message], params: SamplingParams) -> Generation: ...

    def load(self, version_id: str, path: str | Path) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Loaded:
    version_id: str
    model: Any
    tokenizer: Any
    max_context: int


class _EmbeddedGeneration:
    """A `model.generate` call on a thread of its own, read through a text streamer."""

    def __init__(
        self, loaded: _Loaded, input_ids: Any, params: SamplingParams, slots: threading.Semaphore
    ) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self.version_id = loaded.version_id
        self.prompt_tokens = int(input_ids.shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._eos = set(_eos_ids(loaded))
        self._last_token: int | None = None
        engine_self = self

        class _CountingStreamer(TextIteratorStreamer):
            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt:
                    engine_self.completion_tokens += int(value.numel())
                    engine_self._last_token = int(value.reshape(-1)[-1])
                super().put(value)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full(
                    (input_ids.shape[0],),
                    engine_self._cancelled.is_set(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        self._streamer = _CountingStreamer(
            loaded.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        sampling = params.temperature > 0
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(loaded.model.device),
            "attention_mask": _ones_like(input_ids).to(loaded.model.device),
            "max_new_tokens": params.max_tokens,
            "do_sample": sampling,
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled()]),
            "pad_token_id": loaded.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        self._max_tokens = params.max_tokens
        self._thread = threading.Thread(
            target=self._run,
            args=(loaded.model, kwargs, slots),
            daemon=True,
            name=f"generate-{self.version_id}",
        )
        self._thread.start()

    def _run(self, model: Any, kwargs: dict[str, Any], slots: threading.Semaphore) -> None:
        import torch

        try:
            with slots, torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._streamer:
                if text:
                    yield text
        finally:
            self._cancelled.set()
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"generation failed: {self._error}") from self._error
        if self._last_token not in self._eos and self.completion_tokens >= self._max_tokens:
            self.finish_reason = "length"

    def cancel(self) -> None:
        self._cancelled.set()


class EmbeddedEngine:
    """transformers in-process. Concurrent requests each generate on a thread of their own,
    at most `max_concurrency` at once (the rest wait for a slot)."""

    def __init__(
        self,
        model_path: str | Path,
        version_id: str,
        *,
        device: str | None = None,
        max_concurrency: int = 8,
    ) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_concurrency)
        self.last_swap_seconds = 0.0
        self._loaded = self._load(version_id, model_path)

    @property
    def version(self) -> str:
        return self._loaded.version_id

    def _load(self, version_id: str, path: str | Path) -> _Loaded:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.padding_side = "left"  # not saved by transformers 5
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        loaded = _Loaded(version_id, model, tokenizer, max_context)
        # One short generation so the first real request on this version pays no warm-up.
        with torch.inference_mode():
            ids = self._encode(loaded, [Message("user", "hi")])
            model.generate(
                input_ids=ids.to(device),
                attention_mask=_ones_like(ids).to(device),
                max_new_tokens=2,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        return loaded

    @staticmethod
    def _encode(loaded: _Loaded, messages: list[Message]) -> Any:
        text = loaded.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def stream(self, messages: list[Message], params: SamplingParams) -> Generation:
        loaded = self._loaded  # pinned: this request finishes on this version
        input_ids = self._encode(loaded, messages)
        room = loaded.max_context - input_ids.shape[1]
        if room < 1:
            raise PromptTooLongError(
                f"the prompt is {input_ids.shape[1]} tokens; this model reads at most "
                f"{loaded.max_context}"
            )
        if params.max_tokens > room:
            params = SamplingParams(room, params.temperature, params.top_p)
        return _EmbeddedGeneration(loaded, input_ids, params, self._slots)

    def load(self, version_id: str, path: str | Path) -> None:
        """Load `path` beside the served weights, then switch new requests to it."""
        with self._lock:  # one swap at a time; requests never wait on this lock
            started = time.perf_counter()
            self._loaded = self._load(version_id, path)
            self.last_swap_seconds = time.perf_counter() - started

    def close(self) -> None:
        """Nothing to release beyond the weights, which go with the last reference."""


def _eos_ids(loaded: _Loaded) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [eos]


def _ones_like(ids: Any) -> Any:
    import torch

    return torch.ones_like(ids)
