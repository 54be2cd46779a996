"""Several vLLM servers (replicas) behind tuneloop, as one engine (`tuneloop up --engine vllm
--vllm-replicas N`, or `--vllm-url` given several times).

**Routing.** Each answer goes to the healthy replica with the fewest answers outstanding. A
replica whose connection breaks is taken out at once; a probe (every second) brings it back
once it answers `/health` again, after loading back what it lost if it restarted on its own.
An answer whose replica is lost mid-way goes on from another replica serving the same version:
the text so far is sent as the start of the assistant's message and vLLM continues it
(`continue_final_message`), so the client sees one answer, from one version, and no error.

**Promotion, in two phases**, so that no answer sees two versions and every replica switches
at the same instant:

- A LoRA adapter over the served weights (what tuneloop trains), or those weights themselves
  (a rollback to the base): phase one loads the adapter under its version's name on every
  replica at once. If any replica cannot (it died, is restarting, or
  refuses the files), the promotion is aborted: the adapter is let go where it had loaded and
  nothing is switched. Phase two switches the version new answers take, for every replica at
  once (one reference); answers in flight finish on the old version, which each replica unloads
  when idle. The adapter is also published under its version's name in a shared directory
  that the replicas tuneloop starts read through vLLM's filesystem LoRA resolver, so a replica
  that restarts between the phases resolves the new name on its first request.
- Full or merged weights: a server holds one set, so two versions cannot be ready side by side.
  New answers wait, those in flight finish on every replica, every replica reloads, then the
  waiting answers go. If one replica fails to reload, the others load the old weights back.

A replica tuneloop started and restarts comes back serving the current version before it gets
traffic: the supervisor's restart hook loads it (`VllmEngine._restore`) before the server is
reported ready, and only then does the probe route to it again.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

from tuneloop.core.records import Message, SamplingParams
from tuneloop.serve.engine import EngineUnavailableError
from tuneloop.serve.vllm_engine import VllmCanary, VllmEngine, _Route
from tuneloop.serve.vllm_generation import ReplicaLostError, VllmGeneration
from tuneloop.serve.vllm_server import VllmError

PROBE_EVERY_S = 1.0
# How long phase one waits for a replica that is restarting before it aborts the promotion.
PREPARE_WAIT_S = 30.0
# How long an answer waits for a replica (all down, or a weights swap draining).
WAIT_FOR_REPLICA_S = 300.0

T = TypeVar("T")


class _Served:
    """One version as the gateway serves it: its route on each replica (in replica order)."""

    def __init__(self, version_id: str, path: str, routes: Sequence[_Route] = ()) -> None:
        self.version_id = version_id
        self.path = path
        self.routes = list(routes)
        self.ready = threading.Event()  # a weights swap in progress: answers wait
        self.failed = False  # its swap failed: answers that waited on it are refused
        self.bound = 0  # answers made for it that have not ended (begun or not)
        if routes:
            self.ready.set()


class ReplicatedVllm:
    """The Engine protocol over several `VllmEngine`s, all serving the same version."""

    def __init__(
        self,
        replicas: Sequence[VllmEngine],
        path: str | Path,
        *,
        adapter_dir: Path | None = None,
        probe_every_s: float = PROBE_EVERY_S,
    ) -> None:
        if not replicas:
            raise ValueError("no replicas")
        versions = {r.version for r in replicas}
        if len(versions) != 1:
            raise VllmError(f"the replicas serve different versions: {sorted(versions)}")
        self._replicas = list(replicas)
        self._adapter_dir = adapter_dir
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()  # one promotion (or canary start) at a time
        self._outstanding = [0] * len(replicas)
        self._up = [True] * len(replicas)
        self._bound: set[_Served] = set()  # versions with answers not ended
        self._answered = [Counter[str]() for _ in replicas]
        self._taken_over = [0] * len(replicas)  # answers lost mid-way, continued elsewhere
        self._current = _Served(versions.pop(), str(path), [r.current_route for r in replicas])
        self.max_context = min(r.max_context for r in replicas)
        self.last_swap_seconds = 0.0
        self._closing = threading.Event()
        self._probe_every_s = probe_every_s
        self._prober = threading.Thread(target=self._probe, name="vllm-replicas", daemon=True)
        self._prober.start()

    # --- the Engine protocol ---

    @property
    def version(self) -> str:
        return self._current.version_id

    @property
    def ready(self) -> bool:
        return any(self._up)

    def stream(self, messages: list[Message], params: SamplingParams) -> ReplicaGeneration:
        return ReplicaGeneration(self, self._current, messages, params)

    def load(self, version_id: str, path: str | Path) -> None:
        """Serve `version_id` on every replica, or on none (see the module's docstring)."""
        started = time.perf_counter()
        path = str(path)
        with self._swap_lock:
            if all(r.serves_over(path) for r in self._replicas):
                self._promote_adapter(version_id, path)
            else:
                self._promote_weights(version_id, path)
        self.last_swap_seconds = time.perf_counter() - started

    def canary(self, version_id: str, path: str | Path) -> ReplicatedCanary:
        """`version_id`, a LoRA adapter over the served weights, loaded beside the served
        version on every replica (or on none), as an engine of its own (`serve.canary`)."""
        with self._swap_lock:
            published = self._publish(version_id, str(path))
            canaries = self._on_every_replica(
                f"loading the canary {version_id}",
                lambda r: r.canary(version_id, published),
                undo=lambda _, c: c.close(),
            )
        served = _Served(version_id, published, [c.route for c in canaries])
        return ReplicatedCanary(self, served, canaries)

    async def aclose(self) -> None:
        for replica in self._replicas:
            await replica.aclose()

    def close(self) -> None:
        self._closing.set()
        self._prober.join(timeout=self._probe_every_s + 5)
        for replica in self._replicas:
            replica.close()

    def replicas(self) -> list[dict[str, Any]]:
        """What each replica is doing: up or not, answers outstanding, answers by version."""
        with self._cond:
            return [
                {
                    "replica": i,
                    "up": self._up[i],
                    "outstanding": self._outstanding[i],
                    "answered": dict(self._answered[i]),
                    "taken_over": self._taken_over[i],
                }
                for i in range(len(self._replicas))
            ]

    # --- promotion ---

    def _promote_adapter(self, version_id: str, path: str) -> None:
        published = self._publish(version_id, path)
        routes = self._on_every_replica(
            f"loading {version_id}",
            lambda r: r.prepare(version_id, published, wait_s=PREPARE_WAIT_S),
            undo=lambda r, route: r.abandon(route),
        )
        with self._cond:
            self._current = _Served(version_id, published, routes)  # phase two: one reference
        for replica, route in zip(self._replicas, routes, strict=True):
            replica.commit(route)  # its own bookkeeping: the old adapter goes once idle

    def _promote_weights(self, version_id: str, path: str) -> None:
        new = _Served(version_id, path)
        with self._cond:
            old, self._current = self._current, new  # new answers wait on `new.ready`
            # Every answer made for another version ends first, begun or not: one that began
            # after the reload would get the new weights under the old version's name.
            self._cond.wait_for(lambda: all(s is new for s in self._bound))
        try:
            self._on_every_replica(
                f"loading {version_id}",
                lambda r: r.load(version_id, path),
                undo=lambda r, _: r.load(old.version_id, old.path),
            )
        except BaseException:
            new.failed = True
            with self._cond:
                self._current = old
            new.ready.set()
            raise
        new.routes = [r.current_route for r in self._replicas]
        new.ready.set()

    def _on_every_replica(
        self,
        what: str,
        do: Callable[[VllmEngine], T],
        undo: Callable[[VllmEngine, T], object],
    ) -> list[T]:
        """`do` on every replica at once; if any fails, `undo` where it worked and raise."""
        n = len(self._replicas)
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(do, r) for r in self._replicas]
        failed = [(i, f.exception()) for i, f in enumerate(futures) if f.exception()]
        if not failed:
            return [f.result() for f in futures]
        for replica, future in zip(self._replicas, futures, strict=True):
            if future.exception() is None:
                undo(replica, future.result())
        i, exc = failed[0]
        raise VllmError(
            f"{what} failed on replica {i} ({exc}); aborted on all {n} replicas, "
            f"{self._current.version_id} is still served"
        ) from exc

    def _publish(self, version_id: str, path: str) -> str:
        """The adapter under its version's name in the resolver's directory (a symlink, made
        atomically), which is the path the replicas load; `path` itself when there is none."""
        if self._adapter_dir is None:
            return path
        self._adapter_dir.mkdir(parents=True, exist_ok=True)
        link = self._adapter_dir / version_id
        tmp = self._adapter_dir / f".{version_id}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(path).resolve(), target_is_directory=True)
        os.replace(tmp, link)
        return str(link)

    # --- routing ---

    def _acquire(self, served: _Served, tried: set[int], wait_s: float) -> int:
        """The replica an answer goes to (fewest outstanding among those up and not tried),
        counted as outstanding; waits up to `wait_s` for one."""
        if not served.ready.wait(wait_s) or served.failed:
            raise EngineUnavailableError(f"{served.version_id} could not be loaded; try again")
        candidates = [i for i in range(len(self._replicas)) if i not in tried]
        if not candidates:
            raise ReplicaLostError("every replica failed this answer")
        with self._cond:
            if not self._cond.wait_for(lambda: any(self._up[i] for i in candidates), wait_s):
                raise ReplicaLostError("no vLLM replica is up; try again shortly")
            i = min((i for i in candidates if self._up[i]), key=self._outstanding.__getitem__)
            self._outstanding[i] += 1
            return i

    def _acquire_now(self, served: _Served, tried: set[int]) -> int | None:
        """`_acquire` without waiting: None when it would have to wait."""
        if not served.ready.is_set() or not any(self._up):
            return None
        return self._acquire(served, tried, 0.0)

    def _bind(self, served: _Served) -> None:
        with self._cond:
            served.bound += 1
            self._bound.add(served)

    def _unbind(self, answer: ReplicaGeneration) -> None:
        """`answer` ended (or will never begin); once only, whichever thread calls first."""
        with self._cond:
            if not answer._bound:
                return
            answer._bound = False
            served = answer._served
            served.bound -= 1
            if served.bound == 0:
                self._bound.discard(served)
            self._cond.notify_all()

    def _release(self, i: int, version_id: str | None) -> None:
        with self._cond:
            self._outstanding[i] -= 1
            if version_id is not None:
                self._answered[i][version_id] += 1
            self._cond.notify_all()

    def _lost(self, i: int) -> None:
        """Replica `i` lost an answer: take it out until the probe finds it answering again."""
        with self._cond:
            self._up[i] = False
            self._taken_over[i] += 1

    def _probe(self) -> None:
        while not self._closing.wait(self._probe_every_s):
            for i, replica in enumerate(self._replicas):
                healthy = replica.healthy(timeout=2.0)
                if healthy and not self._up[i]:
                    try:
                        replica.reconcile()
                    except Exception:  # noqa: BLE001 - not back yet: the next probe tries again
                        continue
                with self._cond:
                    if healthy != self._up[i]:
                        self._up[i] = healthy
                        self._cond.notify_all()


class ReplicatedCanary:
    """A canary on every replica (`ReplicatedVllm.canary`), as the Engine protocol."""

    last_swap_seconds = 0.0

    def __init__(
        self, gateway: ReplicatedVllm, served: _Served, canaries: list[VllmCanary]
    ) -> None:
        self._gateway = gateway
        self._served = served
        self._canaries = canaries

    @property
    def version(self) -> str:
        return self._served.version_id

    @property
    def ready(self) -> bool:
        return self._gateway.ready

    def stream(self, messages: list[Message], params: SamplingParams) -> ReplicaGeneration:
        return ReplicaGeneration(self._gateway, self._served, messages, params)

    def load(self, version_id: str, path: str | Path) -> None:
        raise VllmError("a canary serves one version; start another canary instead")

    async def aclose(self) -> None:
        """Its connections are the replicas'."""

    def close(self) -> None:
        for canary in self._canaries:
            canary.close()


class ReplicaGeneration:
    """One answer from one version, from whichever replica the gateway picks when it starts
    (not when it is made: a weights swap may make it wait); if that replica is lost mid-way,
    another continues it. `replica` is the one that answered last."""

    def __init__(
        self,
        gateway: ReplicatedVllm,
        served: _Served,
        messages: list[Message],
        params: SamplingParams,
    ) -> None:
        self.version_id = served.version_id
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.replica = -1
        self.failovers = 0
        self._gateway = gateway
        self._served = served
        self._messages = messages
        self._params = params
        self._text: list[str] = []
        self._tried: set[int] = set()
        self._inner: VllmGeneration | None = None
        self._holding = False  # counted as outstanding on `replica`
        self._cancelled = False
        self._bound = True  # counted in its version's answers not ended (`_promote_weights`)
        self._started = False  # its iteration began: that ends it, cancelled or not
        gateway._bind(served)

    def _open(self, replica: int) -> VllmGeneration:
        self.replica, self._holding = replica, True
        engine = self._gateway._replicas[replica]
        prefix = "".join(self._text)
        inner = engine.stream_on(self._served.routes[replica], self._messages, self._params, prefix)
        if not self._text:
            self.prompt_tokens = inner.prompt_tokens
        self._inner = inner
        return inner

    def _finish(self, inner: VllmGeneration) -> None:
        self.completion_tokens = inner.prefix_tokens + inner.completion_tokens
        self.finish_reason = inner.finish_reason
        if not self._text or not inner.prefix_tokens:
            self.prompt_tokens = inner.prompt_tokens
        self._holding = False
        self._gateway._release(self.replica, None if self._cancelled else self.version_id)

    def _failed(self, exc: ReplicaLostError) -> None:
        """Its replica was lost: take it out, count it as tried; the caller picks another."""
        self._holding = False
        self._gateway._lost(self.replica)
        self._gateway._release(self.replica, None)
        self._tried.add(self.replica)
        self.failovers += 1
        if len(self._tried) == len(self._gateway._replicas):
            raise exc

    def __iter__(self) -> Iterator[str]:
        self._started = True
        try:
            while not self._cancelled:
                replica = self._gateway._acquire(self._served, self._tried, WAIT_FOR_REPLICA_S)
                inner = self._open(replica)
                try:
                    for chunk in inner:
                        self._text.append(chunk)
                        yield chunk
                except ReplicaLostError as exc:
                    self._failed(exc)
                    continue
                self._finish(inner)
                return
        finally:
            self._end()

    async def achunks(self, merge_s: float = 0.0) -> AsyncIterator[str]:
        self._started = True
        try:
            while not self._cancelled:
                replica = self._gateway._acquire_now(self._served, self._tried)
                if replica is None:  # a swap drains, or no replica is up: wait off the loop
                    replica = await asyncio.to_thread(
                        self._gateway._acquire, self._served, self._tried, WAIT_FOR_REPLICA_S
                    )
                inner = self._open(replica)
                try:
                    async with aclosing(inner.achunks(merge_s)) as chunks:
                        async for chunk in chunks:
                            self._text.append(chunk)
                            yield chunk
                except ReplicaLostError as exc:
                    self._failed(exc)
                    continue
                self._finish(inner)
                return
        finally:
            self._end()

    def _end(self) -> None:
        """Ended, however: give the replica back (not counted as an answer if it was not)."""
        if self._holding:
            self._holding = False
            self._gateway._release(self.replica, None)
        self._gateway._unbind(self)

    def cancel(self) -> None:
        self._cancelled = True
        if self._inner is not None:
            self._inner.cancel()
        elif not self._started:  # it never will begin
            self._gateway._unbind(self)
