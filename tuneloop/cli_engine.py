"""The engine options shared by `tuneloop up` and `tuneloop simulate`."""

from __future__ import annotations

import argparse
import os
import shlex

from tuneloop.config import ENGINES, VllmSettings

VLLM_MODULE = "vllm.entrypoints.openai.api_server"


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
        f"`PYTHON -m {VLLM_MODULE}` (see README)",
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
        help="attach to a vLLM server the operator runs: http://127.0.0.1:PORT or "
        "unix:/path/to.sock (its API key from --vllm-api-key or VLLM_API_KEY)",
    )
    g.add_argument("--vllm-api-key", help="the API key of the server at --vllm-url")
    g.add_argument(
        "--vllm-max-model-len", type=int, help="context length (default: the model's own)"
    )
    g.add_argument(
        "--vllm-max-lora-rank",
        type=int,
        default=64,
        help="largest LoRA rank to serve (default: %(default)s)",
    )
    g.add_argument(
        "--vllm-kv-cache-gib",
        type=int,
        default=1,
        help="KV cache of vLLM's CPU build, GiB (default: %(default)s)",
    )
    g.add_argument("--vllm-dtype", default="auto", help="default: %(default)s")
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
        command = (args.vllm_python, "-m", VLLM_MODULE)
    else:
        command = ()
    if not command and not args.vllm_url:
        raise SystemExit(
            "tuneloop: --engine vllm needs --vllm-python, --vllm-command or --vllm-url"
        )
    return VllmSettings(
        command=command,
        url=args.vllm_url,
        api_key=args.vllm_api_key or os.environ.get("VLLM_API_KEY"),
        max_model_len=args.vllm_max_model_len,
        max_lora_rank=args.vllm_max_lora_rank,
        kv_cache_gib=args.vllm_kv_cache_gib,
        dtype=args.vllm_dtype,
        extra_args=tuple(args.vllm_arg),
    )
