"""Opening the vLLM engine `VllmSettings` describe: one server or several replicas, started by
tuneloop (and supervised) or attached to."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuneloop.core.artifacts import base_model_path
from tuneloop.core.config import VllmSettings
from tuneloop.core.cpu_affinity import keep_off
from tuneloop.core.records import ModelVersion
from tuneloop.serve.vllm_engine import VllmEngine
from tuneloop.serve.vllm_replicas import ReplicatedVllm
from tuneloop.serve.vllm_server import AttachedVllm, VllmLaunch, VllmServer, parse_vllm_url

# What the replicas' filesystem LoRA resolver reads: adapters published by version name.
ADAPTER_DIR = "adapters"


def vllm_servers(
    vs: VllmSettings, run_dir: Path, version: ModelVersion, max_concurrency: int
) -> list[VllmServer | AttachedVllm]:
    """The servers `vs` names, not started yet: one run dir each under `run_dir` (`run_dir`
    itself for a single server)."""
    if vs.urls:
        return [AttachedVllm(parse_vllm_url(url, vs.api_key)) for url in vs.urls]
    if not vs.command:
        raise ValueError("--engine vllm needs --vllm-python, --vllm-command or --vllm-url")
    servers: list[VllmServer | AttachedVllm] = []
    several = vs.replicas > 1
    for i in range(vs.replicas):
        env = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(run_dir / ADAPTER_DIR)} if several else {}
        if vs.devices:
            env["CUDA_VISIBLE_DEVICES"] = vs.devices[i]
        tp = ("--tensor-parallel-size", str(vs.tensor_parallel)) if vs.tensor_parallel > 1 else ()
        launch = VllmLaunch(
            command=vs.command,
            model=base_model_path(version.artifact_path),
            max_model_len=vs.max_model_len,
            max_lora_rank=vs.max_lora_rank,
            max_loras=max(VllmLaunch.max_loras, max_concurrency),
            dtype=vs.dtype,
            kv_cache_gib=vs.kv_cache_gib,
            nice=vs.nice,
            cpus=vs.cpus[i] if vs.cpus else frozenset(),
            extra_args=(*tp, *vs.extra_args),
            env=env,
        )
        servers.append(VllmServer(launch, run_dir / f"replica-{i}" if several else run_dir))
    return servers


def open_vllm(
    vs: VllmSettings, run_dir: Path, version: ModelVersion, max_concurrency: int
) -> VllmEngine | ReplicatedVllm:
    """The vLLM engine serving `version`: its servers are started (or reached) first, all at
    once, and stopped again if the engine cannot be set up."""
    servers = vllm_servers(vs, run_dir, version, max_concurrency)
    if vs.cpus:
        keep_off(frozenset().union(*vs.cpus))  # tuneloop's threads leave vLLM's CPUs
    if len(servers) > 1:
        (run_dir / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    engines: list[VllmEngine] = []
    try:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            for done in [pool.submit(s.start) for s in servers]:
                done.result()
        # One after another: transformers' lazy imports race when two threads import at once.
        engines = [VllmEngine(s, version.id, version.artifact_path) for s in servers]
        if len(engines) == 1:
            return engines[0]
        return ReplicatedVllm(engines, version.artifact_path, adapter_dir=run_dir / ADAPTER_DIR)
    except BaseException:
        for server in servers:
            server.close()
        raise
