"""Where a deployment keeps its files, and the settings `tuneloop up` runs with."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.core.settings import (
    GateSettings,
    LimitSettings,
    ScheduleSettings,
    TaskSettings,
    TrustSettings,
)
from tuneloop.core.web_settings import WebSettings

DEFAULT_DATA_DIR = Path("tuneloop-data")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Answers generated at once (`--max-concurrency`): the embedded engine's batch, vLLM's LoRA slots.
DEFAULT_MAX_CONCURRENCY = 8
ENGINES = ("embedded", "vllm")

# Serving and training jobs share the CPU. OpenMP's default of spinning idle threads made a server
# ~12x slower beside a running job on 2 cores (bench/hot_swap.py --training-beside: 49 vs 589
# requests in 12 s; a bounded GOMP_SPINCOUNT=10000 still gave only 80), while sleeping threads cost
# a tiny model 30-45% of its tokens/s when it runs alone (bench/RESULTS.md). Applied by the
# `tuneloop` command before torch loads, inherited by job processes; a value already in the
# environment wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_openmp_defaults(environ: MutableMapping[str, str]) -> None:
    """Put `OPENMP_DEFAULTS` into `environ` where it has no value of its own."""
    for name, value in OPENMP_DEFAULTS.items():
        environ.setdefault(name, value)


@dataclass(frozen=True)
class DataDir:
    """The layout of a data dir: the DuckDB file, model versions, snapshots, logs."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "feedback.duckdb"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def runs(self) -> Path:
        """One folder per training run: its status file and log."""
        return self.root / "runs"

    @property
    def server_file(self) -> Path:
        """Written by a running server: its URL and pid, so the CLI can reach it."""
        return self.root / "server.json"

    @property
    def admin_token_file(self) -> Path:
        """The first admin's bearer token, readable by the owner of the data dir only."""
        return self.root / "admin.token"

    @property
    def gateway_token_file(self) -> Path:
        """The secret `tuneloop gateway` processes sign in to this server with (owner only)."""
        return self.root / "gateway.token"

    def restrict(self) -> None:
        """Make the data dir its owner's alone (0700), and its token and log files (0600),
        however they were created before."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        private = [self.admin_token_file, self.gateway_token_file, *self.root.glob("**/*.log")]
        for path in private:
            if path.is_file():
                os.chmod(path, 0o600)

    @property
    def inbox(self) -> Path:
        """Files for a running server to read (imports, training configs): the CLI copies them
        here, since the server reads files inside the data dir only (and `--allow-files`)."""
        return self.root / "inbox"


# vLLM's OpenAI server as a module: the CPU build's `vllm serve` script cannot find its own
# distribution, `python -m` of this module works on every build.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_python_command(python: str) -> tuple[str, ...]:
    """The command that starts vLLM's OpenAI server from the interpreter `python`."""
    return (python, "-m", VLLM_SERVER_MODULE)


@dataclass(frozen=True)
class VllmSettings:
    """How `--engine vllm` reaches vLLM: `replicas` servers it starts (`command`, e.g. `python -m
    vllm.entrypoints.openai.api_server` from vLLM's own environment), or those it attaches to
    (`urls`: `http://host:port` or `unix:/path/to.sock`, with `api_key`). Several servers are
    replicas behind tuneloop (`serve.vllm_replicas`).

    `cpus` and `devices` hold one entry per replica it starts: the CPUs its processes run on
    (`taskset -c`), and the GPUs it sees (`CUDA_VISIBLE_DEVICES`, e.g. "0,1"), each used by
    `tensor_parallel` ranks."""

    command: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    api_key: str | None = None
    replicas: int = 1
    max_model_len: int | None = None
    max_lora_rank: int = 64
    kv_cache_gib: int = 1
    dtype: str = "auto"
    nice: int = 0
    cpus: tuple[frozenset[int], ...] = ()
    devices: tuple[str, ...] = ()
    tensor_parallel: int = 1
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServeConfig:
    data_dir: DataDir
    model: str | None = None
    engine: str = "embedded"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    device: str | None = None
    ui: bool = True
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    # Folders besides the data dir whose files the admin API may read (imports, configs).
    file_dirs: tuple[Path, ...] = ()
    vllm: VllmSettings = field(default_factory=VllmSettings)
    web: WebSettings = field(default_factory=WebSettings)
