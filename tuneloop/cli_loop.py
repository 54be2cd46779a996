"""The loop's subcommands: train, promote, rollback, runs, data import, eval.

Like the others they open the DuckDB file when no server runs, and otherwise ask the server that
holds it (whose engine then hot-swaps on promote and rollback)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tuneloop.cli_engine import add_engine_arguments, vllm_settings
from tuneloop.cli_model import MODEL_HELP, add_model_argument
from tuneloop.cli_settings import add_options, option_values, settings_from_args
from tuneloop.core.config import DataDir
from tuneloop.core.records import to_json_dict
from tuneloop.core.settings import (
    DEFAULT_MODEL,
    JOB_KINDS,
    CycleSettings,
    GateSettings,
    SettingsError,
    TrustSettings,
)
from tuneloop.models import ModelError, resolve_model
from tuneloop.remote import (
    ask_server,
    audit_locally,
    call,
    follow_cycle,
    local_or_server,
    stage_file,
)
from tuneloop.simulate import SimulationConfig


def _cmd_train(args: argparse.Namespace) -> int:
    from tuneloop.feedback.store import FeedbackStore, StoreLockedError
    from tuneloop.loop.job_runner import JobFailed
    from tuneloop.loop.pipeline import NothingToTrainError, Pipeline

    dd = DataDir(args.data_dir)
    try:
        cycle = settings_from_args(CycleSettings, args)
        # Files read by a server or job with another working directory.
        for key in ("config_file", "accelerate_config"):
            if getattr(cycle, key) is not None:
                cycle = replace(cycle, **{key: getattr(cycle, key).resolve()})
        settings, reward_settings = cycle.job_settings(), cycle.reward_settings()
    except SettingsError as exc:
        raise SystemExit(f"tuneloop: {exc}") from exc
    try:
        store = FeedbackStore(dd.db)
    except StoreLockedError:
        _refuse_model_with_server(args)
        for key in ("config_file", "accelerate_config"):
            if getattr(cycle, key) is not None:
                cycle = replace(cycle, **{key: stage_file(dd, getattr(cycle, key))})
        ask_server(dd, "POST", "/v1/admin/train", _train_request(cycle, args))
        print(f"tuneloop: the server started a {cycle.kind} cycle", file=sys.stderr)
        return _follow_server_cycle(dd)
    try:
        _ensure_base(store, args, "trained from by `tuneloop train --model {model}`")
        pipeline = Pipeline(
            dd,
            store,
            gate=settings_from_args(GateSettings, args),
            trust=settings_from_args(TrustSettings, args),
            trigger="cli",
            log=lambda msg: print(f"tuneloop: {msg}", file=sys.stderr, flush=True),
        )
        audit_locally(store, "train", cycle.kind, **_train_request(cycle, args))
        result = pipeline.run(
            cycle.kind,
            settings,
            reward_settings=reward_settings,
            retrain_reward=not cycle.keep_reward,
            gate=cycle.gate,
        )
    except (JobFailed, NothingToTrainError, ModelError, ValueError) as exc:
        raise SystemExit(f"tuneloop: {exc}") from exc
    finally:
        store.close()
    print(json.dumps(result.to_dict(), default=str))
    return 0


def _train_request(cycle: CycleSettings, args: argparse.Namespace) -> dict[str, Any]:
    """The cycle as `POST /v1/admin/train` takes it, gate options included: the request sent to
    a server, and the detail of the audit row written without one (as the server's)."""
    return {**to_json_dict(cycle), **option_values(GateSettings, args)}


def _ensure_base(store: Any, args: argparse.Namespace, reason: str) -> None:
    """Register `--model` (or, on a fresh data dir, the default model) as the served policy."""
    from tuneloop.feedback.registry import ensure_served_policy

    ensure_served_policy(
        store,
        args.model,
        lambda spec: resolve_model(spec, demo_seconds=args.demo_seconds),
        reason=reason,
        default=DEFAULT_MODEL,
    )


def _refuse_model_with_server(args: argparse.Namespace) -> None:
    if args.model is not None:
        raise SystemExit(
            "tuneloop: a server holds this data dir and serves its own policy; drop --model "
            "(or `tuneloop promote` a version)"
        )


def _follow_server_cycle(dd: DataDir) -> int:
    """Print the server's running job and its progress until the cycle ends."""
    last = follow_cycle(
        lambda route: ask_server(dd, "GET", route),
        lambda line: print(f"tuneloop: {line}", file=sys.stderr, flush=True),
    )
    print(json.dumps(last, default=str))
    return 0 if last.get("status") == "done" else 1


def _cmd_promote(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from tuneloop.loop.promotion import Promotion

        version = Promotion(store).promote(args.version, reason=args.reason, force=args.force)
        audit_locally(store, "promote", version.id, force=args.force)
        return to_json_dict(version)

    body = {"version": args.version, "force": args.force}
    version = _registry_call(args, local, "/v1/admin/promote", body)
    print(f"promoted {version['id']} ({version['artifact_path']})")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from tuneloop.loop.promotion import Promotion

        version = Promotion(store).rollback(reason=args.reason)
        audit_locally(store, "rollback", version.id)
        return to_json_dict(version)

    version = _registry_call(args, local, "/v1/admin/rollback", {})
    print(f"rolled back to {version['id']} ({version['artifact_path']})")
    return 0


def _registry_call(
    args: argparse.Namespace, local: Callable[[Any], Any], route: str, body: dict[str, Any]
) -> dict[str, Any]:
    from tuneloop.feedback.registry import RegistryError

    return call(args.data_dir, local, "POST", route, body, refused=(RegistryError,))


def _cmd_runs(args: argparse.Namespace) -> int:
    def local(store: Any) -> list[dict[str, Any]]:
        from tuneloop.feedback.runs import list_runs

        return [to_json_dict(r) for r in list_runs(store, args.limit)]

    runs = local_or_server(
        DataDir(args.data_dir), local, "GET", f"/v1/admin/runs?limit={args.limit}"
    )
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'id':<40}{'kind':<6}{'status':<9}{'progress':>9}  {'version':<12}error")
    for r in runs:
        print(
            f"{r['id']:<40}{r['kind']:<6}{r['status']:<9}{r['progress']:>9.0%}  "
            f"{r['version_id'] or '-':<12}{r['error'] or ''}"
        )
    return 0


def _cmd_data_import(args: argparse.Namespace) -> int:
    path = args.file.resolve()

    def local(store: Any) -> dict[str, Any]:
        from tuneloop.feedback.importer import import_preferences

        result = import_preferences(store, path, rater_id=args.rater, limit=args.limit)
        audit_locally(store, "import", str(path), **asdict(result))
        if args.model is not None:
            _ensure_base(store, args, "registered by `tuneloop data import --model {model}`")
        return to_json_dict(result)

    from tuneloop.feedback.importer import ImportFormatError
    from tuneloop.feedback.store import FeedbackStore, StoreLockedError

    try:
        store = FeedbackStore(DataDir(args.data_dir).db)
    except StoreLockedError:
        _refuse_model_with_server(args)
        if args.rater != "import":
            message = "through a server, imported rows are the 'import' rater's"
            raise SystemExit(f"tuneloop: {message}") from None
        store = None
    try:
        if store is None:
            dd = DataDir(args.data_dir)
            body = {"path": str(stage_file(dd, path)), "limit": args.limit}
            result = ask_server(dd, "POST", "/v1/admin/import", body)
        else:
            result = local(store)
    except (ImportFormatError, ModelError, OSError) as exc:
        raise SystemExit(f"tuneloop: {exc}") from exc
    finally:
        if store is not None:
            store.close()
    print(json.dumps(result))
    return 0


def _cmd_eval_rm(args: argparse.Namespace) -> int:
    from tuneloop.train.scoring import evaluate_file

    if args.model is not None:
        if not args.model.is_dir():
            raise SystemExit(f"tuneloop: no reward model directory at {args.model}")
        version = {"id": str(args.model.resolve()), "artifact_path": str(args.model.resolve())}
    else:
        version = _registered_reward_model(args)
    try:
        result = evaluate_file(Path(version["artifact_path"]), args.data)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"tuneloop: {exc}") from exc
    result = {"version": version["id"], **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{version['id']}: accuracy {result['accuracy']:.3f} on {result['pairs']} pairs "
            f"(mean margin {result['margin']:.3f})"
        )
    return 0


def _registered_reward_model(args: argparse.Namespace) -> dict[str, Any]:
    """`--version`, else the promoted reward model, else the newest one."""

    def local(store: Any) -> list[dict[str, Any]]:
        from tuneloop.feedback.registry import list_versions

        return [to_json_dict(v) for v in list_versions(store, "reward")]

    versions = [
        v
        for v in local_or_server(DataDir(args.data_dir), local, "GET", "/v1/admin/versions")
        if v["kind"] == "reward"
    ]
    if args.version:
        chosen = [v for v in versions if v["id"] == args.version]
        if not chosen:
            raise SystemExit(f"tuneloop: no reward model version {args.version!r}")
    else:
        chosen = [v for v in versions if v["status"] == "promoted"] or versions
        if not chosen:
            raise SystemExit("tuneloop: no reward model yet; run `tuneloop train rm` first")
    return chosen[0]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from tuneloop.simulate import run_simulation

    try:
        config = settings_from_args(
            SimulationConfig,
            args,
            data_dir=args.data_dir,
            model=args.model,
            engine=args.engine,
            vllm=vllm_settings(args),
        )
        summary = run_simulation(config)
    except (SettingsError, ModelError) as exc:
        raise SystemExit(f"tuneloop: {exc}") from exc
    print(json.dumps(summary))
    return 0


def register(command: Callable[..., Any]) -> None:
    """Add the loop's subcommands; `command(name, help, fn, parent=None, group=False)` adds one
    with `--data-dir` (to the top level, or to the `parent` subparsers), or a `group` of
    subcommands that take it themselves."""
    kinds = "; ".join(f"{name} ({kind.learns_from})" for name, kind in JOB_KINDS.items())
    train = command(
        "train",
        f"train a version from the feedback now: {kinds}. A policy is gated against the served "
        "one and promoted if it passes",
        _cmd_train,
    )
    add_options(train, CycleSettings)
    add_model_argument(train)
    add_options(train, GateSettings)
    add_options(train, TrustSettings)

    promote = command("promote", "serve a version (hot-swaps a running server)", _cmd_promote)
    promote.add_argument("version")
    promote.add_argument(
        "--force", action="store_true", help="serve a version that was rejected, all the same"
    )
    promote.add_argument("--reason", default="promoted by the operator")

    rollback = command(
        "rollback", "serve the policy promoted before the current one again", _cmd_rollback
    )
    rollback.add_argument("--reason", default="rolled back by the operator")

    runs = command("runs", "training runs, newest first, with progress and errors", _cmd_runs)
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")

    data = command("data", "external data", None, group=True)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    imp = command(
        "import",
        "load preference pairs (TRL format, or HH-RLHF chosen/rejected dialogues) as "
        "comparisons from an 'import' rater",
        _cmd_data_import,
        parent=data_sub,
    )
    imp.add_argument("file", type=Path, help=".jsonl, .jsonl.gz or .json")
    imp.add_argument("--rater", default="import")
    imp.add_argument("--limit", type=int, help="import at most this many pairs")
    add_model_argument(imp)

    sim = command(
        "simulate",
        "run the whole loop with simulated users and raters on a fresh data dir; prints a JSON "
        "summary (win rate of the new version over the baseline) as its last line",
        _cmd_simulate,
    )
    add_options(sim, SimulationConfig)
    sim.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: %(default)s)")
    add_engine_arguments(sim)

    ev = command("eval", "evaluate a model version", None, group=True)
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    rm = command(
        "rm",
        "reward-model accuracy on a preference file: the fraction of pairs it orders right",
        _cmd_eval_rm,
        parent=ev_sub,
    )
    which = rm.add_mutually_exclusive_group()
    which.add_argument("--version", help="reward version id (default: the latest)")
    which.add_argument(
        "--model",
        type=Path,
        help="a reward-model checkpoint dir to evaluate instead of a registered version",
    )
    rm.add_argument("--data", type=Path, required=True, help="preference pairs file")
    rm.add_argument("--json", action="store_true")
