"""Engines turn a conversation into a stream of text, and swap the weights they serve.

The embedded engine runs transformers in this process (CPU or one GPU). Atomic swap: `load()`
builds the new model beside the old one, then replaces one reference. A request pins the
reference it found when it started, so it finishes on that version (each version decodes in a
batch of its own); the old weights are freed when its last request ends.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneloop.core.artifacts import load_causal_lm, load_tokenizer
from tuneloop.core.config import DEFAULT_MAX_CONCURRENCY
from tuneloop.core.records import Message, ModelVersion, SamplingParams
from tuneloop.serve.batching import BatchedGeneration, DecodeLoop


class PromptTooLongError(ValueError):
    """The prompt leaves no room for an answer in the model's context window."""


class EngineUnavailableError(RuntimeError):
    """The engine cannot answer now (a remote engine is down or restarting)."""


class EngineLoadError(RuntimeError):
    """A version could not be loaded; the engine serves what it served before."""


def encode_prompt(
    tokenizer: Any, messages: list[Message], max_context: int
) -> tuple[list[int], int]:
    """The prompt's token ids, as every engine reads a chat (the model's chat template with the
    generation prompt, tokenized without special tokens added: what vLLM counts too), and the
    room left for the answer. PromptTooLongError when there is none."""
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    room = max_context - len(ids)
    if room < 1:
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens; this model reads at most {max_context}"
        )
    return ids, room


class Generation(Protocol):
    """One answer being generated. Iterate for text chunks; stats are final after the end."""

    version_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def __iter__(self) -> Iterator[str]: ...

    def achunks(self, merge_s: float = 0.0) -> AsyncIterator[str]:
        """The same text, iterated on an event loop; chunks decoded within `merge_s` of each
        other may arrive joined."""
        ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    last_swap_seconds: float  # how long the last `load` took

    @property
    def version(self) -> str: ...

    @property
    def ready(self) -> bool:
        """Whether it can answer now."""
        ...

    def stream(self, messages: list[Message], params: SamplingParams) -> Generation: ...

    def load(self, version_id: str, path: str | Path) -> None: ...

    async def aclose(self) -> None:
        """Release what it holds on the running event loop (the server's shutdown awaits it)."""
        ...

    def close(self) -> None: ...


class ServedEngine:
    """The engine as the loop sees it (`tuneloop.loop.control.Serving`): the served version, and
    a hot-swap that loads a version beside the served weights, then switches new requests."""

    def __init__(self, engine: Engine, log: Callable[[str], None]) -> None:
        self.engine = engine
        self.log = log

    @property
    def version(self) -> str | None:
        return self.engine.version

    def swap(self, version: ModelVersion) -> None:
        self.log(f"loading {version.id} ({version.artifact_path})")
        try:
            self.engine.load(version.id, version.artifact_path)
        except Exception as exc:
            served = self.engine.version
            raise EngineLoadError(
                f"loading {version.id} failed ({exc}); {served} is still served"
            ) from exc
        loaded = self.engine.last_swap_seconds
        # The new weights' objects would otherwise make every full GC pass slower (see server).
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        collected = time.perf_counter() - started
        self.log(f"serving {version.id} (swap {loaded:.3f} s, gc {collected:.3f} s)")


@dataclass(frozen=True)
class _Loaded:
    version_id: str
    tokenizer: Any
    max_context: int
    decoder: DecodeLoop


class EmbeddedEngine:
    """transformers in-process. Concurrent requests decode together in one batch per version
    (see `batching`), at most `max_concurrency` rows at once; the rest wait to join."""

    def __init__(
        self,
        model_path: str | Path,
        version_id: str,
        *,
        device: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self._device = device
        self._max_batch = max_concurrency
        self._lock = threading.Lock()
        self.last_swap_seconds = 0.0
        self._loaded = self._load(version_id, model_path)

    @property
    def version(self) -> str:
        return self._loaded.version_id

    @property
    def ready(self) -> bool:
        return True  # in this process: if this runs, so does the engine

    def _load(self, version_id: str, path: str | Path) -> _Loaded:
        import torch

        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, device=device, dtype=dtype)
        max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        decoder = DecodeLoop(model, tokenizer, _eos_ids(model, tokenizer), self._max_batch)
        loaded = _Loaded(version_id, tokenizer, max_context, decoder)
        # A short answer first, so that the first real request on this version pays no warm-up.
        "".join(self._generate(loaded, [Message("user", "hi")], SamplingParams(2, 0.0)))
        return loaded

    def stream(self, messages: list[Message], params: SamplingParams) -> Generation:
        return self._generate(self._loaded, messages, params)  # pinned to the served version

    def _generate(
        self, loaded: _Loaded, messages: list[Message], params: SamplingParams
    ) -> BatchedGeneration:
        import torch

        ids, room = encode_prompt(loaded.tokenizer, messages, loaded.max_context)
        if params.max_tokens > room:
            params = SamplingParams(room, params.temperature, params.top_p)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return BatchedGeneration(loaded.version_id, loaded.decoder.submit(input_ids, params))

    def load(self, version_id: str, path: str | Path) -> None:
        """Load `path` beside the served weights, then switch new requests to it."""
        with self._lock:  # one swap at a time; requests never wait on this lock
            started = time.perf_counter()
            self._loaded = self._load(version_id, path)
            self.last_swap_seconds = time.perf_counter() - started

    async def aclose(self) -> None:
        """Nothing held on an event loop: streams wait on the decode thread's events."""

    def close(self) -> None:
        """Nothing to release beyond the weights, which go with the last reference."""


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [eos]
