"""The `tuneloop` command. Heavy imports happen inside the subcommands so `--help` stays fast.

A subcommand that needs the database opens the DuckDB file itself when no server runs; while
`tuneloop up` holds it (DuckDB allows one read-write process) it goes through that server's API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.cli_engine import (
    add_engine_arguments,
    add_vllm_env_arguments,
    make_vllm_env,
    vllm_settings,
)
from tuneloop.cli_gateway import add_gateway_arguments, cmd_gateway
from tuneloop.cli_model import (
    MODEL_HELP,
    add_demo_seconds_argument,
    add_model_argument,
    cmd_model,
)
from tuneloop.cli_settings import add_options, settings_from_args
from tuneloop.core.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PORT,
    DataDir,
    apply_openmp_defaults,
)
from tuneloop.core.settings import (
    DEFAULT_MODEL,
    GateSettings,
    LimitSettings,
    ScheduleSettings,
    SettingsError,
    TaskSettings,
    TrustSettings,
)
from tuneloop.core.web_settings import WebSettings
from tuneloop.models import ModelError, resolve_model
from tuneloop.remote import ServerError, audit_locally, local_or_server


def _cmd_up(args: argparse.Namespace) -> int:
    from tuneloop.core.config import ServeConfig
    from tuneloop.feedback.store import StoreLockedError
    from tuneloop.serve.server import run_server

    dd = DataDir(args.data_dir)
    config = ServeConfig(
        dd,
        model=args.model,
        engine=args.engine,
        vllm=vllm_settings(args),
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
        ui=not args.no_ui,
        schedule=settings_from_args(ScheduleSettings, args),
        gate=settings_from_args(GateSettings, args),
        limits=settings_from_args(LimitSettings, args),
        trust=settings_from_args(TrustSettings, args),
        tasks=settings_from_args(TaskSettings, args),
        file_dirs=tuple(p.resolve() for p in args.allow_files),
        web=settings_from_args(WebSettings, args),
    )

    def resolve(spec: str) -> str:
        return resolve_model(spec, demo_seconds=args.demo_seconds)

    def ready(url: str) -> None:
        docs = ", docs at /docs" if config.web.api_docs else ""
        print(f"tuneloop: serving {url}  (chat UI at /, API at /v1{docs})", flush=True)

    from tuneloop.serve.vllm_server import VllmError

    try:
        run_server(config, resolve, on_ready=ready)
    except (StoreLockedError, VllmError, ModelError) as exc:
        print(f"tuneloop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    counts = local_or_server(
        DataDir(args.data_dir), lambda s: s.feedback_counts(), "GET", "/v1/feedback/stats"
    )
    if args.json:
        print(json.dumps(counts))
    else:
        for kind, n in counts.items():
            print(f"{kind:<14}{n:>10}")
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    dd = DataDir(args.data_dir)

    def local(store: Any) -> dict[str, Any]:
        from tuneloop.feedback.snapshot import create_snapshot

        snap = create_snapshot(store, dd.snapshots, settings_from_args(TrustSettings, args))
        audit_locally(store, "snapshot", snap.id)
        return {"id": snap.id, "path": str(snap.path), "manifest": snap.manifest}

    result = local_or_server(dd, local, "POST", "/v1/admin/snapshot")
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from tuneloop.feedback.datasets import build_datasets

    dd = DataDir(args.data_dir)
    snapshots = sorted(p for p in dd.snapshots.glob("snap-*") if (p / "manifest.json").exists())
    if args.snapshot:
        chosen = dd.snapshots / args.snapshot
        if chosen not in snapshots:
            raise SystemExit(f"tuneloop: no finished snapshot {args.snapshot} in {dd.snapshots}")
    elif snapshots:
        chosen = snapshots[-1]
    else:
        raise SystemExit("tuneloop: no snapshot yet; run `tuneloop snapshot` first")
    built = build_datasets(chosen, heldout_percent=args.heldout_percent)
    print(json.dumps({name: str(files) for name, files in built.items()}, indent=2))
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    def local(store: Any) -> list[dict[str, Any]]:
        from tuneloop.core.records import to_json_dict
        from tuneloop.feedback.registry import list_versions

        return [to_json_dict(v) for v in list_versions(store)]

    rows = local_or_server(DataDir(args.data_dir), local, "GET", "/v1/admin/versions")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'id':<14}{'kind':<8}{'status':<11}{'parent':<14}{'snapshot':<34}artifact")
    for v in rows:
        print(
            f"{v['id']:<14}{v['kind']:<8}{v['status']:<11}{v['parent'] or '-':<14}"
            f"{v['snapshot_id'] or '-':<34}{v['artifact_path']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneloop", description="A chat assistant that learns from its own users."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        help_text: str,
        fn: Callable[[argparse.Namespace], int] | None,
        parent: Any = None,
        group: bool = False,
    ) -> Any:
        p = (parent or sub).add_parser(name, help=help_text, description=help_text)
        if group:  # its subcommands take --data-dir (argparse lets a subparser's default win)
            return p
        p.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help="where the database, models and snapshots live (default: %(default)s)",
        )
        p.set_defaults(fn=fn)
        return p

    up = command(
        "up", f"serve the chat UI and the API (fetches {DEFAULT_MODEL} on first use)", _cmd_up
    )
    add_model_argument(up)
    add_engine_arguments(up)
    up.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    up.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="answers generated at once (default: %(default)s)",
    )
    up.add_argument("--no-ui", action="store_true", help="serve the API only, no Gradio UI")
    up.add_argument(
        "--allow-files",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder besides the data dir whose files operators may import or train with "
        "through the API (repeatable)",
    )
    add_options(up, ScheduleSettings)
    add_options(up, GateSettings)
    add_options(up, LimitSettings)
    add_options(up, TrustSettings)
    add_options(up, TaskSettings)
    add_options(up, WebSettings)

    gateway = command(
        "gateway",
        "serve the chat and feedback API beside `tuneloop up`, recording into its store",
        cmd_gateway,
    )
    add_gateway_arguments(gateway)

    model = command(
        "model",
        "fetch or build a model into the per-user cache (once) and print its checkpoint dir",
        cmd_model,
    )
    model.add_argument(
        "name",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"{MODEL_HELP} (default: %(default)s)",
    )
    add_demo_seconds_argument(model)

    vllm_env = command(
        "vllm-env",
        "make (or find) vLLM's own Python environment for --engine vllm and print its "
        "interpreter (the CPU build unless --gpu; ~3.5 GB, a few minutes)",
        make_vllm_env,
    )
    add_vllm_env_arguments(vllm_env)

    stats = command("stats", "feedback rows per kind", _cmd_stats)
    stats.add_argument("--json", action="store_true")

    snapshot = command(
        "snapshot",
        "freeze the feedback into an immutable Parquet snapshot with a manifest (the rows the "
        "trust policy admits; a running server applies its own)",
        _cmd_snapshot,
    )
    add_options(snapshot, TrustSettings)

    ds = command(
        "datasets",
        "build TRL datasets (preference, KTO, SFT; train and held-out) from a snapshot",
        _cmd_datasets,
    )
    ds.add_argument("--snapshot", help="snapshot id (default: the newest)")
    ds.add_argument("--heldout-percent", type=int, default=10)

    versions = command(
        "versions", "the model versions: status, parent, snapshot, artifact", _cmd_versions
    )
    versions.add_argument("--json", action="store_true")

    from tuneloop import cli_audit, cli_loop, cli_raters, cli_users

    cli_loop.register(command)
    cli_users.register(command)
    cli_raters.register(command)
    cli_audit.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_openmp_defaults(os.environ)
    # Conversations, feedback, tokens and logs are personal data: whatever this command (and
    # the jobs it starts) creates is its user's alone.
    os.umask(0o077)
    try:
        return args.fn(args)
    except SettingsError as exc:  # settings that parse but do not fit, e.g. --gate-prompts 0
        print(f"tuneloop: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"tuneloop: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
