"""Continuous batching for the embedded engine: every request of one model version decodes in
one batch, and requests join and leave between steps.

Each request is prefilled alone; its KV cache is then left-padded to the batch's length and
appended to the batch cache, with a 2-D attention mask hiding the padding and explicit position
ids, so every row computes exactly what it would alone (tested against `generate`). Finished rows
are dropped between steps. One loop (thread) runs per model version while it has requests; a
swapped-out version's loop ends with its last request, which frees its weights.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tuneloop.core.records import SamplingParams

_END = object()


@dataclass(eq=False)
class _Row:
    """One request inside the batch."""

    input_ids: Any
    params: SamplingParams
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    finish_reason: str = "stop"
    # Set by an async reader while it waits: called (from the decode thread) after each put.
    wake: Callable[[], None] | None = None

    def send(self, item: Any) -> None:
        self.out.put(item)
        if self.wake is not None:
            self.wake()


class BatchedGeneration:
    """One answer being generated in a batch; iterate for text chunks."""

    def __init__(self, version_id: str, row: _Row) -> None:
        self.version_id = version_id
        self.prompt_tokens = int(row.input_ids.shape[1])
        self._row = row

    @property
    def completion_tokens(self) -> int:
        return len(self._row.tokens)

    @property
    def finish_reason(self) -> str:
        return self._row.finish_reason

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._row.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {item}") from item
                yield item
        finally:
            self._row.cancelled.set()  # a reader that stops early frees its row

    async def achunks(self, merge_s: float = 0.0) -> AsyncIterator[str]:
        """Iterate on an event loop, without a thread per stream. After each chunk it waits
        `merge_s` so that the tokens decoded meanwhile go out as one chunk: fewer, larger
        events cost the server less per token (the first chunk is never held back)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        row = self._row

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        try:
            while True:
                parts, done = self._drain()
                if parts:
                    yield "".join(parts)
                if done:
                    return
                if parts and merge_s > 0:
                    await asyncio.sleep(merge_s)  # the decode thread is not woken meanwhile
                    continue
                ready.clear()
                row.wake = wake
                if row.out.empty():  # else something came after the drain: no wait
                    await ready.wait()
                row.wake = None
        finally:
            row.wake = None
            row.cancelled.set()

    def _drain(self) -> tuple[list[str], bool]:
        """The chunks queued so far, and whether the answer has ended."""
        parts: list[str] = []
        while True:
            try:
                item = self._row.out.get_nowait()
            except queue.Empty:
                return parts, False
            if item is _END:
                return parts, True
            if isinstance(item, BaseException):
                raise RuntimeError(f"generation failed: {item}") from item
            parts.append(item)

    def cancel(self) -> None:
        self._row.cancelled.set()


class DecodeLoop:
    """The batch of one model version. `submit` from any thread."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], max_batch: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos = set(eos_ids)
        self._max_batch = max_batch
        self._inbox: queue.Queue[_Row] = queue.Queue()
        self._lock = threading.Lock()
        self._running = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None

    def submit(self, input_ids: Any, params: SamplingParams) -> _Row:
        row = _Row(input_ids, params)
        with self._lock:
            self._inbox.put(row)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True, name="decode-loop").start()
        return row

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._lock:
                    if not self._rows and self._inbox.empty():
                        self._running = False
                        return
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - every waiting reader gets the error
                    for row in self._rows:
                        row.send(exc)
                        row.send(_END)
                    self._rows, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        """Prefill waiting requests (each alone) and merge them into the batch."""
        while len(self._rows) < self._max_batch:
            try:
                row = self._inbox.get_nowait()
            except queue.Empty:
                return
            if row.cancelled.is_set():
                row.send(_END)
                continue
            self._prefill(row)

    def _prefill(self, row: _Row) -> None:
        import torch
        from transformers import DynamicCache

        device = self._model.device
        ids = row.input_ids.to(device)
        cache = DynamicCache()
        logits = self._model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=device)
        self._merge(cache, mask, row)
        self._emit([row], _sample(logits[:, -1, :], [row.params]))

    def _merge(self, cache: Any, mask: Any, row: _Row) -> None:
        from transformers import DynamicCache

        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, [row]
            return
        length = max(self._mask.shape[1], mask.shape[1])
        layers = [
            (
                _cat_left_padded(old.keys, new.keys, length),
                _cat_left_padded(old.values, new.values, length),
            )
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = _cat_left_padded(self._mask, mask, length)
        self._rows.append(row)

    def _step(self) -> None:
        import torch

        device = self._model.device
        last = torch.tensor([[r.tokens[-1]] for r in self._rows], device=device)
        ones = torch.ones(len(self._rows), 1, dtype=self._mask.dtype, device=device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1
        logits = self._model(
            input_ids=last,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        ).logits
        self._emit(self._rows, _sample(logits[:, -1, :], [r.params for r in self._rows]))

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        """Stream each row's new text; drop the rows that are done."""
        done = []
        for row, token in zip(rows, tokens, strict=True):
            if token in self._eos:
                row.finish_reason = "stop"
                done.append(row)
                continue
            row.tokens.append(token)
            text = self._tokenizer.decode(row.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > row.sent_chars:  # whole characters
                row.send(text[row.sent_chars :])
                row.sent_chars = len(text)
            if len(row.tokens) >= row.params.max_tokens:
                row.finish_reason = "length"
                done.append(row)
            elif row.cancelled.is_set():
                done.append(row)
        for row in done:
            text = self._tokenizer.decode(row.tokens, skip_special_tokens=True)
            if len(text) > row.sent_chars:  # what was held back for a character still incomplete
                row.send(text[row.sent_chars :])
            row.send(_END)
        if done:
            self._drop(done)

    def _drop(self, done: list[_Row]) -> None:
        import torch

        keep = [i for i, r in enumerate(self._rows) if r not in done]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask.index_select(0, index)
        self._cache.batch_select_indices(index)
        # Columns that are padding in every remaining row can go.
        first = int((self._mask.sum(dim=0) > 0).nonzero()[0])
        if first:
            from transformers import DynamicCache

            self._mask = self._mask[:, first:]
            self._cache = DynamicCache(
                ddp_cache_data=[
                    (layer.keys[:, :, first:], layer.values[:, :, first:])
                    for layer in self._cache.layers
                ]
            )


def _cat_left_padded(a: Any, b: Any, length: int) -> Any:
    """Concatenate on the batch dim after left-padding dim 2 (caches) or dim 1 (masks)."""
    import torch
    import torch.nn.functional as F

    def pad(t: Any) -> Any:
        missing = length - t.shape[-2 if t.dim() == 4 else -1]
        if not missing:
            return t
        return F.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))

    return torch.cat([pad(a), pad(b)], dim=0)


def _sample(logits: Any, params: list[SamplingParams]) -> list[int]:
    """Per-row temperature and top-p; temperature 0 is greedy."""
    import torch

    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    if bool((temps == 0).all()):
        return greedy.tolist()
    probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picked = order.gather(1, torch.multinomial(sorted_probs, 1)).squeeze(1)
    return torch.where(temps == 0, greedy, picked).tolist()
