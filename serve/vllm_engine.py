"""The vLLM engine: answers come from a vLLM server through its OpenAI API; swaps never mix
versions within one answer.

How a swap happens depends on what the new version is (see `load`):

- **A LoRA policy over the weights vLLM already holds** (every adapter tuneloop trains applies to
  the root base): the adapter is loaded under a new name (the version id) with
  `/v1/load_lora_adapter`, new requests name it, and the previous adapter is unloaded once its
  last request has ended (on a server tuneloop started: one it attaches to may be shared with a
  gateway, which may still answer from it). Never loaded in place: requests would mix
  policies, and the prefix cache could serve blocks computed by the old one. Takes
  milliseconds; nothing waits.
- **Full or merged weights** (or an adapter whose base is not the weights vLLM holds): vLLM holds
  one set of base weights, and no answer may see two. New requests wait; the ones in flight
  finish; then `reload_weights` (through `/collective_rpc`) and `/reset_prefix_cache` (cached KV
  blocks were computed by the old weights); then the waiting requests go. Chosen over blue/green
  (a second vLLM server on the new weights) because it needs no second copy of the weights and
  the KV cache: on one GPU, or on CPU, memory is what runs out first. Its cost is the drain: new
  requests wait for the longest answer in flight.

Rollback is a swap like any other. Every answer carries the version id it was routed to, which
is the version that produced every one of its tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tuneloop.core.artifacts import base_model_path, is_adapter, load_tokenizer
from tuneloop.core.records import Message, SamplingParams
from tuneloop.serve.engine import encode_prompt
from tuneloop.serve.vllm_generation import ReplicaLostError, VllmGeneration
from tuneloop.serve.vllm_server import AttachedVllm, VllmError, VllmServer

# How long a request waits for a swap's drain or a restarting server before it is refused.
_WAIT_FOR_SERVER_S = 300.0


@dataclass(eq=False)
class _Route:
    """Where new requests for one version go: the model name vLLM knows it by."""

    version_id: str
    model: str
    weights: str  # the base weights vLLM must hold for it
    adapter_path: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    inflight: int = 0
    retired: bool = False
    failed: bool = False  # its swap failed: requests waiting on it are refused


# What must match for vLLM to load new weights into the model it runs.
_SHAPE_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def _check_same_shapes(new: str, served: str) -> None:
    """Refuse weights of another shape than the served model's before vLLM sees them: a
    mismatched `reload_weights` kills vLLM's worker (the CPU build 0.32 did)."""
    configs = [Path(p) / "config.json" for p in (new, served)]
    if not all(c.exists() for c in configs):
        return  # hub ids: vLLM's own check is all there is
    a, b = (json.loads(c.read_text()) for c in configs)
    differ = [k for k in _SHAPE_KEYS if a.get(k) != b.get(k)]
    if differ:
        shown = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in differ)
        raise VllmError(f"{new} has another shape than the served model ({shown})")


def _same_path(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


class VllmEngine:
    """The Engine protocol over a vLLM server (`VllmServer`, which tuneloop supervises, or
    `AttachedVllm`). Starts serving `version_id` from `path` before returning."""

    def __init__(
        self, server: VllmServer | AttachedVllm, version_id: str, path: str | Path
    ) -> None:
        self._server = server
        self._endpoint = server.endpoint
        self._client = self._endpoint.client(timeout=None)
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._chat_url = f"{self._endpoint.base_url}/v1/chat/completions"
        base = self._models()[0]
        self._base_name: str = base["id"]
        self._launch_weights: str = str(base.get("root") or base["id"])
        self.max_context: int = int(base.get("max_model_len") or 2048)
        self._weights = self._launch_weights
        self._tokenizer = load_tokenizer(path)
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()  # one swap (or adapter unload) at a time
        self._adapters: dict[str, _Route] = {}  # loaded in vLLM, by adapter name
        self._active: set[_Route] = set()  # routes with requests in flight
        self._canaries: set[_Route] = set()  # adapters served beside the current version
        self._current = _Route("", self._base_name, self._weights)
        self._current.ready.set()
        self.last_swap_seconds = 0.0
        self.load(version_id, path)
        server.on_restart = self._restore

    # --- the Engine protocol ---

    @property
    def version(self) -> str:
        return self._current.version_id

    @property
    def ready(self) -> bool:
        """False while the supervisor restarts vLLM (or an attached one stops answering)."""
        return self._server.wait_ready(0)

    def stream(self, messages: list[Message], params: SamplingParams) -> VllmGeneration:
        return self._stream(None, messages, params)

    def _stream(
        self,
        pinned: _Route | None,
        messages: list[Message],
        params: SamplingParams,
        prefix: str = "",
    ) -> VllmGeneration:
        """An answer from `pinned` (a canary's route), else from the current version."""
        ids, room = encode_prompt(self._tokenizer, messages, self.max_context)
        prompt_tokens = len(ids)
        with self._cond:
            route = pinned or self._current
            route.inflight += 1
            self._active.add(route)
        chat = [{"role": m.role, "content": m.content} for m in messages]
        body: dict[str, Any] = {"model": route.model, "messages": chat}
        prefix_tokens = 0
        if prefix:
            chat.append({"role": "assistant", "content": prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
            prefix_tokens = len(self._tokenizer(prefix, add_special_tokens=False)["input_ids"])
        body.update(
            max_tokens=max(1, min(params.max_tokens - prefix_tokens, room - prefix_tokens)),
            temperature=params.temperature,
            top_p=params.top_p,
            stream=True,
            stream_options={"include_usage": True},
        )
        generation = VllmGeneration(self, route, body, prompt_tokens)
        generation.prefix_tokens = prefix_tokens
        return generation

    def load(self, version_id: str, path: str | Path) -> None:
        """Serve `version_id` (an adapter or full weights at `path`) to new requests."""
        started = time.perf_counter()
        path = str(path)
        adapter = path if is_adapter(path) else None
        weights = base_model_path(path)
        if not self._server.wait_ready(_WAIT_FOR_SERVER_S):
            raise VllmError("the vLLM server is not ready; nothing was swapped")
        with self._swap_lock:
            if not _same_path(weights, self._weights):
                self._swap_weights(
                    _Route(version_id, self._name(version_id, adapter), weights, adapter)
                )
            else:
                self._switch(self._route_beside(version_id, path))
        self.last_swap_seconds = time.perf_counter() - started

    def close(self) -> None:
        self._server.close()
        self._client.close()

    def canary(self, version_id: str, path: str | Path) -> VllmCanary:
        """`version_id`, a LoRA adapter over the weights served now, loaded beside the served
        version on the same vLLM server, as an engine of its own (`serve.canary`): vLLM serves
        several adapters at once. Full weights cannot: one server holds one set."""
        route = self.prepare(version_id, path)
        with self._cond:
            self._canaries.add(route)
        return VllmCanary(self, route)

    def serves_over(self, path: str | Path) -> bool:
        """Whether `path` can be served beside what this server serves now, without touching its
        weights: a LoRA adapter over them, or those very weights."""
        path = str(path)
        return _same_path(base_model_path(path), self._weights)

    def prepare(
        self, version_id: str, path: str | Path, *, wait_s: float = _WAIT_FOR_SERVER_S
    ) -> _Route:
        """Make `version_id` (a LoRA adapter over the served weights, or those weights) ready
        beside what is served, and return its route, without switching anything: a canary's
        first step, and the first phase of a promotion across replicas
        (`serve.vllm_replicas`). VllmError if it cannot."""
        if not self.serves_over(path):
            raise VllmError(
                f"{version_id} has weights of its own: vLLM serves one set of weights at a "
                "time, so it cannot be loaded beside the served version (only a LoRA adapter "
                "over the served weights can)"
            )
        if not self._server.wait_ready(wait_s):
            raise VllmError("the vLLM server is not ready; nothing was loaded")
        with self._swap_lock:
            return self._route_beside(version_id, str(path))

    def _route_beside(self, version_id: str, path: str) -> _Route:
        """With `_swap_lock` held: the ready route of `path`, an adapter over the served
        weights (loaded unless it still is) or those weights themselves."""
        if is_adapter(path):
            route = self._adapter_route(version_id, path)
        else:
            route = _Route(version_id, self._base_name, self._weights)
        with self._cond:
            route.retired = False
        route.ready.set()
        return route

    def commit(self, route: _Route) -> None:
        """Make a prepared route the one this server's own new requests take (the second
        phase of a promotion across replicas)."""
        with self._swap_lock:
            self._switch(route)

    def abandon(self, route: _Route) -> None:
        """A prepared route that will not serve (an aborted promotion): unload it once idle,
        unless it serves after all."""
        with self._cond:
            if route is not self._current and route not in self._canaries:
                route.retired = True
                self._unload_if_idle(route)

    @property
    def current_route(self) -> _Route:
        return self._current

    def healthy(self, timeout: float = 2.0) -> bool:
        """Ready (not restarting) and answering `/health` now."""
        return self._server.wait_ready(0) and self._endpoint.healthy(timeout)

    def reconcile(self) -> None:
        """After the server answered again: if it lost the adapters it served (it restarted
        without tuneloop restarting it: `--vllm-url`), load them back."""
        listed = {m["id"] for m in self._models()}
        served = (self._current, *self._canaries)
        if any(r.adapter_path and r.model not in listed for r in served):
            self._restore()

    def stream_on(
        self, route: _Route, messages: list[Message], params: SamplingParams, prefix: str = ""
    ) -> VllmGeneration:
        """An answer from `route`; with `prefix`, the rest of an answer that began with it
        (another replica's, lost mid-answer): vLLM continues the assistant's last message."""
        return self._stream(route, messages, params, prefix)

    def _end_canary(self, route: _Route) -> None:
        with self._cond:
            self._canaries.discard(route)
            if route is not self._current:  # a canary promoted serves on
                route.retired = True
                self._unload_if_idle(route)

    # --- swaps ---

    def _name(self, version_id: str, adapter: str | None) -> str:
        """What requests for a version call the model: its adapter's name, else the base's."""
        return version_id if adapter else self._base_name

    def _adapter_route(self, version_id: str, adapter: str) -> _Route:
        """The route of `adapter`, loaded under the name `version_id` unless it still is."""
        route = self._adapters.get(version_id)
        if route is None:
            self._load_adapter(version_id, adapter)
            route = _Route(version_id, version_id, self._weights, adapter)
            self._adapters[version_id] = route
        return route

    def _load_adapter(self, name: str, adapter: str) -> None:
        try:
            self._admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapter})
        except VllmError as exc:
            # Loaded there already, by another tuneloop server in front of the same vLLM (a
            # gateway and its primary): version names name one set of files.
            if "already been loaded" not in str(exc):
                raise

    def _switch(self, route: _Route) -> None:
        route.ready.set()
        with self._cond:
            old, self._current = self._current, route
            route.retired = False
            if old is not route:
                old.retired = True
                self._unload_if_idle(old)

    def _swap_weights(self, route: _Route) -> None:
        """Drain, reload the base weights, reset the prefix cache, then let new requests go.

        `route` is not ready yet: new requests take it and wait. If the reload fails, the old
        weights are loaded back, the old version serves again, and the requests that waited are
        refused (they were promised the new version)."""
        _check_same_shapes(route.weights, self._weights)  # vLLM's worker dies on a mismatch
        with self._cond:
            old, self._current = self._current, route
            old.retired = True
            self._cond.wait_for(lambda: self._inflight_except(route) == 0)
        try:
            self._reload(route.weights)
            if route.adapter_path:
                # An adapter still loaded is the same adapter over the same root base: keep it.
                if route.model not in self._adapters:
                    self._load_adapter(route.model, route.adapter_path)
                self._adapters[route.model] = route
        except Exception:
            route.failed = True
            with contextlib.suppress(VllmError, httpx.HTTPError):
                self._reload(old.weights)
            with self._cond:
                self._current, old.retired = old, False
            route.ready.set()
            raise
        route.ready.set()
        with self._cond:
            for r in list(self._adapters.values()):
                self._unload_if_idle(r)

    def _inflight_except(self, route: _Route) -> int:
        return sum(r.inflight for r in self._active if r is not route)

    def _reload(self, weights: str) -> None:
        self._admin(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights}}
        )
        self._admin("/reset_prefix_cache", None)
        self._weights = weights

    def _unload_if_idle(self, route: _Route) -> None:
        """Called with `_cond` held: unload a retired adapter once nothing runs on it. Not on a
        server others share (a gateway may still answer from it): a loaded adapter costs
        memory, and vLLM keeps only the most recently used ones on the device."""
        if self._server.shared:
            return
        if route.adapter_path and route.retired and route.inflight == 0:
            threading.Thread(target=self._unload, args=(route,), daemon=True).start()

    def _unload(self, route: _Route) -> None:
        with self._swap_lock:
            with self._cond:
                idle = route.retired and route.inflight == 0 and route is not self._current
                if not idle or self._adapters.get(route.model) is not route:
                    return
                del self._adapters[route.model]
            # An adapter left loaded costs memory, not correctness.
            with contextlib.suppress(VllmError):
                self._admin("/v1/unload_lora_adapter", {"lora_name": route.model})

    def _restore(self) -> None:
        """After vLLM restarted on its launch weights: load the served version back."""
        with self._swap_lock:
            self._adapters.clear()
            self._weights = self._launch_weights
            current = self._current
            if not _same_path(current.weights, self._weights):
                self._reload(current.weights)
            for route in (current, *self._canaries):
                if route.adapter_path and route.model not in self._adapters:
                    self._load_adapter(route.model, route.adapter_path)
                    self._adapters[route.model] = route

    # --- requests ---

    def _release(self, route: _Route) -> None:
        with self._cond:
            route.inflight -= 1
            if route.inflight == 0:
                self._active.discard(route)
            self._cond.notify_all()
            self._unload_if_idle(route)

    def _wait_until_servable(self, route: _Route) -> None:
        if not (
            route.ready.wait(_WAIT_FOR_SERVER_S) and self._server.wait_ready(_WAIT_FOR_SERVER_S)
        ):
            raise ReplicaLostError("the vLLM server is not ready; try again shortly")

    def _session(self) -> aiohttp.ClientSession:
        """The running loop's session for streaming from vLLM: aiohttp, which read an answer for
        a quarter of httpx's CPU (`bench/stream_client.py`); `aclose` closes it."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = self._sessions[loop] = self._endpoint.aiohttp_session()
        return session

    async def aclose(self) -> None:
        """Close the running loop's connections to vLLM (the server's shutdown calls it)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    def _models(self) -> list[dict[str, Any]]:
        r = self._client.get("/v1/models")
        if r.status_code != 200:
            raise VllmError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
        return r.json()["data"]

    def _admin(self, route: str, body: dict[str, Any] | None) -> None:
        r = self._client.post(route, json=body, timeout=120.0)
        if r.status_code != 200:
            raise VllmError(f"vLLM {route} answered {r.status_code}: {r.text[:300]}")


class VllmCanary:
    """A canary on the served engine's vLLM server (`VllmEngine.canary`), as the Engine
    protocol: its answers come from its adapter; `close` unloads it once idle, unless it has
    been promoted meanwhile."""

    last_swap_seconds = 0.0

    def __init__(self, engine: VllmEngine, route: _Route) -> None:
        self._engine = engine
        self._route = route

    @property
    def version(self) -> str:
        return self._route.version_id

    @property
    def route(self) -> _Route:
        return self._route

    @property
    def ready(self) -> bool:
        return self._engine.ready

    def stream(self, messages: list[Message], params: SamplingParams) -> VllmGeneration:
        return self._engine._stream(self._route, messages, params)

    def load(self, version_id: str, path: str | Path) -> None:
        raise VllmError("a canary serves one version; start another canary instead")

    async def aclose(self) -> None:
        """Its connections are the served engine's."""

    def close(self) -> None:
        self._engine._end_canary(self._route)
