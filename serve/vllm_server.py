"""A vLLM OpenAI-compatible server for the vLLM engine: started and supervised by tuneloop, or
one the operator already runs.

vLLM pins its own torch and transformers, so it runs from a Python environment of its own:
tuneloop starts it as `<command> --model ...`, where the command is by default
`<python> -m vllm.entrypoints.openai.api_server` (the `vllm serve` script of the CPU build cannot
find its own distribution).

Security: vLLM's admin and development routes (`/collective_rpc`, `/pause`, `/update_weights`,
`/reset_prefix_cache`, LoRA loading) are not guarded by its `--api-key`, which covers `/v1/*`
only. A server tuneloop starts therefore listens on no TCP port at all but on a Unix socket in a
directory only the data dir's owner may enter (mode 0700), and still gets a fresh API key at each
start (passed in the environment, not on the command line where `ps` shows it). tuneloop's own
public port never proxies to it: the engine calls named routes only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import httpx

from tuneloop.core.config import VllmSettings
from tuneloop.core.cpu_affinity import format_cpu_list

# Linux's limit for a Unix socket path is 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH = 100
_HEALTH_EVERY_S = 5.0
_HEALTH_FAILURES_BEFORE_RESTART = 3
_MAX_RESTART_DELAY_S = 30.0
# vLLM's uvicorn closes connections idle for 5 s; ours let them go sooner, so that a request is
# rarely sent on a connection the server is closing (the engine retries once when it is).
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)


class VllmError(RuntimeError):
    """vLLM did not start, did not answer, or refused a request tuneloop needs."""


@dataclass(frozen=True)
class VllmEndpoint:
    """Where a vLLM server answers: a base URL, through a Unix socket when `uds` is set."""

    base_url: str
    api_key: str | None = None
    uds: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float | None = 30.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds, limits=_LIMITS) if self.uds else None
        return httpx.Client(
            base_url=self.base_url,
            headers=self.headers(),
            timeout=timeout,
            transport=transport,
            limits=_LIMITS,
        )

    def aiohttp_session(self) -> aiohttp.ClientSession:
        """For the streams: no timeout (an answer takes as long as it takes), idle connections
        let go after 2 s like the httpx clients'. Make it on the loop that will use it; it takes
        whole URLs (`base_url` + path)."""
        if self.uds:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=self.uds, limit=0, keepalive_timeout=_LIMITS.keepalive_expiry
            )
        else:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_LIMITS.keepalive_expiry)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self.headers(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            with self.client(timeout) as c:
                return c.get("/health").status_code == 200
        except httpx.HTTPError:
            return False


@dataclass(frozen=True)
class VllmLaunch:
    """How to start vLLM: the command that runs its OpenAI server, the model, and the limits.

    `kv_cache_gib` sets `VLLM_CPU_KVCACHE_SPACE` (the CPU build's KV cache); GPU builds size
    their cache with `--gpu-memory-utilization`, which `extra_args` can pass. The defaults are
    `VllmSettings`'."""

    command: tuple[str, ...]
    model: str
    served_name: str = "base"
    max_model_len: int | None = VllmSettings.max_model_len  # None: the model's own
    max_lora_rank: int = VllmSettings.max_lora_rank
    max_loras: int = 4
    dtype: str = VllmSettings.dtype
    kv_cache_gib: int = VllmSettings.kv_cache_gib
    # A niceness for vLLM's processes (`nice -n`), for a machine where it shares the CPU.
    nice: int = VllmSettings.nice
    # The CPUs vLLM's processes run on (`taskset -c`); empty: wherever the OS puts them.
    cpus: frozenset[int] = frozenset()
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, socket_path: str) -> list[str]:
        return [
            *(("taskset", "-c", format_cpu_list(self.cpus)) if self.cpus else ()),
            *(("nice", "-n", str(self.nice)) if self.nice else ()),
            *self.command,
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--uds",
            socket_path,
            "--dtype",
            self.dtype,
            *(("--max-model-len", str(self.max_model_len)) if self.max_model_len else ()),
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            str(self.max_loras),
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]


class VllmServer:
    """Starts vLLM, waits until it answers, restarts it after a crash or when it stops
    answering, and stops it (the whole process group) on `close()`.

    Logs go to `<run_dir>/vllm.log`, appended to across restarts; `<run_dir>/vllm.pid` holds the
    pid of the running server, whose process group holds the engine and workers it started.
    After a restart, `on_restart` runs before the server is reported ready again, so that the
    engine can load the served weights and adapter back."""

    shared = False  # this tuneloop server alone sends it requests

    def __init__(
        self,
        launch: VllmLaunch,
        run_dir: Path,
        *,
        ready_timeout_s: float = 600.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.launch = launch
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "vllm.log"
        self.pid_path = self.run_dir / "vllm.pid"
        self.ready_timeout_s = ready_timeout_s
        self.on_restart = on_restart
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._socket_dir = self._make_socket_dir()
        self.endpoint = VllmEndpoint(
            "http://vllm", secrets.token_urlsafe(24), str(self._socket_dir / "vllm.sock")
        )
        self._watcher: threading.Thread | None = None

    def _make_socket_dir(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sock_dir = self.run_dir / "sock"
        if len(str(sock_dir / "vllm.sock")) > _MAX_SOCKET_PATH:
            return Path(tempfile.mkdtemp(prefix="tuneloop-vllm-"))  # created with mode 0700
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        sock_dir.chmod(0o700)
        return sock_dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start vLLM and return once it answers `/health`; raise VllmError if it exits first
        or is not ready within `ready_timeout_s`."""
        self._spawn()
        self._wait_ready()
        self._ready.set()
        self._watcher = threading.Thread(target=self._watch, name="vllm-supervisor", daemon=True)
        self._watcher.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _spawn(self) -> None:
        Path(self.endpoint.uds).unlink(missing_ok=True)  # type: ignore[arg-type]
        env = dict(os.environ)
        env.update(
            {
                "VLLM_API_KEY": self.endpoint.api_key or "",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc and /reset_prefix_cache
                "VLLM_CPU_KVCACHE_SPACE": str(self.launch.kv_cache_gib),
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.launch.env)
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the server's life
        argv = self.launch.argv(self.endpoint.uds)  # type: ignore[arg-type]
        self._log.write(f"\n=== tuneloop: starting vLLM: {' '.join(argv)}\n".encode())
        self._log.flush()
        executable = shutil.which(argv[0])
        if executable is None:
            raise VllmError(
                f"cannot start vLLM: {argv[0]} is not an executable here "
                "(make vLLM's environment with `tuneloop vllm-env`)"
            )
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its engine and worker processes go with it on close
        )
        self.pid_path.write_text(f"{self._proc.pid}\n")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._closing.is_set():
                raise VllmError("vLLM was stopped while starting")
            code = self._proc.poll() if self._proc else None
            if code is not None:
                raise VllmError(
                    f"vLLM exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if Path(self.endpoint.uds).exists() and self.endpoint.healthy():  # type: ignore[arg-type]
                return
            time.sleep(0.5)
        self._kill()
        raise VllmError(
            f"vLLM did not answer within {self.ready_timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _watch(self) -> None:
        """Restart vLLM when it exits or stops answering, with a growing delay between tries."""
        failures = 0
        delay = 1.0
        while not self._closing.is_set():
            exited = self._proc is not None and self._proc.poll() is not None
            if not exited:
                failures = 0 if self.endpoint.healthy() else failures + 1
                if failures < _HEALTH_FAILURES_BEFORE_RESTART:
                    self._closing.wait(_HEALTH_EVERY_S)
                    continue
            self._ready.clear()
            reason = "exited" if exited else "stopped answering /health"
            self._note(f"vLLM {reason}; restarting in {delay:.0f} s")
            self._kill()
            if self._closing.wait(delay):
                return
            try:
                self._spawn()
                self._wait_ready()
                if self.on_restart is not None:
                    self.on_restart()
            except Exception as exc:  # noqa: BLE001 - keep supervising; the log says why
                self._note(f"restart failed: {exc}")
                delay = min(delay * 2, _MAX_RESTART_DELAY_S)
                continue
            failures, delay = 0, 1.0
            self._ready.set()

    def _note(self, line: str) -> None:
        if self._log is not None:
            self._log.write(f"=== tuneloop: {line}\n".encode())
            self._log.flush()
        print(f"tuneloop: {line}", file=sys.stderr, flush=True)

    def _kill(self, grace_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            _signal_group(proc, signal.SIGKILL)  # stray engine processes of a dead server
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)

    def close(self) -> None:
        """Stop vLLM and everything it started; tuneloop's supervisor stops first."""
        self._closing.set()
        self._ready.clear()
        if self._watcher is not None:
            self._watcher.join(timeout=_HEALTH_EVERY_S + 5)
        self._kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.endpoint.uds:
            Path(self.endpoint.uds).unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)


def _signal_group(proc: subprocess.Popen[Any] | None, sig: int) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def parse_vllm_url(url: str, api_key: str | None) -> VllmEndpoint:
    """`http://host:port` or `unix:/path/to.sock` as an endpoint."""
    if url.startswith("unix:"):
        return VllmEndpoint("http://vllm", api_key, url.removeprefix("unix:"))
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--vllm-url must start with http://, https:// or unix:, got {url!r}")
    return VllmEndpoint(url.rstrip("/"), api_key)


class AttachedVllm:
    """A vLLM server the operator runs (`--vllm-url`): tuneloop neither starts nor restarts it.

    For hot-swaps it must allow runtime LoRA updating (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`)
    and, for merged weights, run in dev mode (`VLLM_SERVER_DEV_MODE=1`); keep it on loopback or a
    Unix socket, since those routes ignore its API key."""

    on_restart: Callable[[], None] | None = None
    # Other tuneloop servers may serve from it too (`tuneloop gateway`): adapters stay loaded.
    shared = True

    def __init__(self, endpoint: VllmEndpoint) -> None:
        self.endpoint = endpoint

    def start(self) -> None:
        if not self.endpoint.healthy():
            raise VllmError(f"no vLLM server answers at {self.endpoint.base_url}")

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Requests go to it whatever its state: it is the operator's to restart."""
        return True

    def close(self) -> None:
        """Not ours to stop."""
