"""`tuneloop tasks`, `raters`, `leaderboard` and `canary`: the raters' workbench and the human
gate, for operators. On the DuckDB file when no server runs, else through the server's admin routes;
making tasks needs the server (its engine writes the answers)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuneloop.core.settings import MAX_TASK_ANSWERS, TrustSettings
from tuneloop.remote import ServerError, call, local_actor


def _call(
    args: argparse.Namespace,
    local: Callable[[Any], Any],
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
) -> Any:
    from tuneloop.feedback.validation import FeedbackError

    return call(args.data_dir, local, method, route, body, refused=(FeedbackError, KeyError))


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: JSON lines with a `prompt` field, else one prompt per line."""
    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            prompts.append(str(json.loads(line)["prompt"]))
        else:
            prompts.append(line.strip())
    return prompts


def _cmd_make(args: argparse.Namespace) -> int:
    def local(_: Any) -> Any:
        raise ServerError("making tasks needs a running server, whose engine answers the prompts")

    body: dict[str, Any] = {"answers": args.answers, "overlap": args.overlap}
    if args.prompts:
        body |= {"source": "prompts", "prompts": read_prompts(args.prompts)}
    else:
        body |= {"source": "traffic", "limit": args.limit}
    made = _call(args, local, "POST", "/v1/admin/tasks", body)["made"]
    print(f"made {len(made)} rating tasks" + (f": {made[0]}..{made[-1]}" if made else ""))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, int]:
        from tuneloop.feedback.tasks import task_counts

        return task_counts(store)

    counts = _call(args, local, "GET", "/v1/admin/tasks")
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any] | None:
        from tuneloop.feedback.tasks import task_detail

        return task_detail(store, args.task)

    found = _call(args, local, "GET", f"/v1/admin/tasks/{args.task}")
    if found is None:
        raise ServerError(f"no task {args.task}")
    print(json.dumps(found, indent=2, default=str))
    return 0


def _cmd_gold(args: argparse.Namespace) -> int:
    answer = None if args.clear else args.response_id

    def local(store: Any) -> None:
        from tuneloop.feedback.tasks import set_gold

        set_gold(store, args.task, answer, actor=local_actor())

    _call(args, local, "POST", f"/v1/admin/tasks/{args.task}/gold", {"response_id": answer})
    print(f"task {args.task}: " + (f"gold, best answer {answer}" if answer else "not gold"))
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_raters(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from tuneloop.feedback.raters import rater_report

        report = rater_report(store)
        return {
            "alpha": report.alpha,
            "raters": [asdict(r) | {"gold_accuracy": r.gold_accuracy} for r in report.raters],
            "pairs": [asdict(p) for p in report.pairs],
        }

    report = _call(args, local, "GET", "/v1/admin/raters")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Krippendorff's alpha, all raters: {_num(report['alpha'])}")
    print(f"{'rater':<20}{'shared':>8}{'alpha':>8}{'gold':>10}  quarantined")
    for r in report["raters"]:
        gold = f"{r['gold_correct']}/{r['gold_total']}" if r["gold_total"] else "-"
        held = "yes" if r["quarantined"] else ""
        print(f"{r['name']:<20}{r['judgments']:>8}{_num(r['alpha']):>8}{gold:>10}  {held}")
    return 0


def _cmd_quarantine(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, list[str]]:
        from tuneloop.feedback import raters

        names = list(args.names)
        if args.below_alpha is not None or args.below_gold is not None:
            names += raters.below(
                raters.rater_report(store),
                alpha=args.below_alpha,
                gold_accuracy=args.below_gold,
                min_judgments=args.min_judgments,
            )
        held = raters.quarantine(store, sorted(set(names)), args.reason, actor=local_actor())
        return {"quarantined": held}

    body = {
        "names": args.names,
        "below_alpha": args.below_alpha,
        "below_gold": args.below_gold,
        "min_judgments": args.min_judgments,
        "reason": args.reason,
    }
    held = _call(args, local, "POST", "/v1/admin/raters/quarantine", body)["quarantined"]
    print("quarantined: " + (", ".join(held) if held else "no one new"))
    return 0


def _cmd_reinstate(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, str]:
        from tuneloop.feedback.raters import reinstate

        if not reinstate(store, args.name, actor=local_actor()):
            raise KeyError(f"{args.name} is not quarantined")
        return {"reinstated": args.name}

    _call(args, local, "POST", f"/v1/admin/raters/{args.name}/reinstate")
    print(f"reinstated {args.name}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    def local(store: Any) -> list[dict[str, Any]]:
        from tuneloop.feedback.leaderboard import version_leaderboard

        trust = TrustSettings()
        return [asdict(s) for s in version_leaderboard(store, trust, rounds=args.rounds)]

    board = _call(args, local, "GET", f"/v1/admin/leaderboard?rounds={args.rounds}")
    if args.json:
        print(json.dumps(board, indent=2))
        return 0
    if not board:
        print("no human comparisons between two versions yet")
        return 0
    print(f"{'version':<40}{'rating':>8}{'95% interval':>18}{'battles':>9}{'wins':>8}")
    for s in board:
        span = f"{s['lower']:.0f}-{s['upper']:.0f}"
        line = f"{s['version']:<40}{s['rating']:>8.0f}{span:>18}{s['battles']:>9}"
        print(f"{line}{s['wins']:>8.1f}")
    return 0


def _needs_server(what: str) -> Callable[[Any], Any]:
    def local(_: Any) -> Any:
        raise ServerError(f"{what} needs a running server, which serves the canary")

    return local


def _cmd_canary_status(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from tuneloop.feedback.canary import list_canaries

        return {"running": None, "history": [asdict(c) for c in list_canaries(store)]}

    found = _call(args, local, "GET", "/v1/admin/canary")
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    running = found["running"]
    if running:
        v = running["verdict"]
        rate = "-" if v["win_rate"] is None else f"{v['win_rate']:.3f}"
        bounds = "" if v["lower"] is None else f" [{v['lower']:.3f}, {v['upper']:.3f}]"
        print(
            f"canary {running['version']} against {running['baseline']} on "
            f"{running['share']:.0%} of conversations: {v['judgments']} of "
            f"{running['min_judgments']} judgments, win rate {rate}{bounds}, bar "
            f"{running['min_win_rate']}"
        )
    else:
        print("no canary is running")
    for c in found["history"]:
        if c["status"] != "running":
            result = c["result"] or {}
            rate = result.get("win_rate")
            shown = "-" if rate is None else f"{rate:.3f}"
            print(f"  {c['version_id']}: {c['status']} (win rate {shown})")
    return 0


def _cmd_canary_start(args: argparse.Namespace) -> int:
    body = {
        "version": args.version,
        "share": args.share,
        "judgments": args.judgments,
        "win_rate": args.win_rate,
    }
    _call(args, _needs_server("a canary"), "POST", "/v1/admin/canary", body)
    print(f"{args.version} is in canary")
    return 0


def _cmd_canary_check(args: argparse.Namespace) -> int:
    found = _call(args, _needs_server("the human gate"), "POST", "/v1/admin/canary/check")
    print(json.dumps(found["verdict"], indent=2))
    return 0


def _cmd_canary_stop(args: argparse.Namespace) -> int:
    body = {"reason": args.reason}
    stopped = _call(args, _needs_server("a canary"), "POST", "/v1/admin/canary/stop", body)
    print(f"stopped the canary of {stopped['version_id']}; it stays a candidate")
    return 0


def register(command: Callable[..., Any]) -> None:
    """Add `tasks`, `raters` and `leaderboard` (see `tuneloop.cli_loop.register`)."""
    tasks = command(
        "tasks", "rating tasks: prompts with answers for raters to judge", None, group=True
    )
    sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    make = command(
        "make",
        "make tasks from new traffic (or --prompts FILE) on the running server",
        _cmd_make,
        parent=sub,
    )
    make.add_argument("--prompts", type=Path, help="a file of prompts: lines, or JSON lines")
    make.add_argument("--limit", type=int, default=10, help="traffic: at most this many tasks")
    make.add_argument("--answers", type=int, choices=range(2, MAX_TASK_ANSWERS + 1))
    make.add_argument("--overlap", type=int, help="raters per task (default: the server's)")
    command("status", "how many tasks: open, done, gold; judgments", _cmd_status, parent=sub)
    show = command("show", "a task: its answers, versions and raters", _cmd_show, parent=sub)
    show.add_argument("task", type=int)
    gold = command("gold", "make a task gold: its known best answer", _cmd_gold, parent=sub)
    gold.add_argument("task", type=int)
    gold.add_argument("response_id", type=int, nargs="?")
    gold.add_argument("--clear", action="store_true", help="not gold any more")

    raters = command("raters", "raters' agreement, gold accuracy and quarantine", None, group=True)
    rsub = raters.add_subparsers(dest="raters_command", required=True, metavar="ACTION")
    listing = command(
        "list", "agreement (Krippendorff's alpha) and gold accuracy", _cmd_raters, parent=rsub
    )
    listing.add_argument("--json", action="store_true")
    hold = command(
        "quarantine",
        "keep raters' rows out of every later snapshot (named, or below a threshold)",
        _cmd_quarantine,
        parent=rsub,
    )
    hold.add_argument("names", nargs="*")
    hold.add_argument("--below-alpha", type=float, help="and those agreeing less than this")
    hold.add_argument("--below-gold", type=float, help="and those less accurate on gold tasks")
    hold.add_argument("--min-judgments", type=int, default=20)
    hold.add_argument("--reason", default="quarantined by the operator")
    free = command("reinstate", "let a rater's rows train again", _cmd_reinstate, parent=rsub)
    free.add_argument("name")

    board = command(
        "leaderboard",
        "model versions ranked by human comparisons: Bradley-Terry ratings, bootstrap intervals",
        _cmd_leaderboard,
    )
    board.add_argument("--json", action="store_true")
    board.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds")

    canary = command(
        "canary", "the human gate: a candidate served to a share of chats, judged by people",
        None, group=True,
    )  # fmt: skip
    csub = canary.add_subparsers(dest="canary_command", required=True, metavar="ACTION")
    status = command(
        "status", "the running canary, its verdict so far, and those before", _cmd_canary_status,
        parent=csub,
    )  # fmt: skip
    status.add_argument("--json", action="store_true")
    start = command(
        "start", "hold a candidate in canary (the running server loads it)", _cmd_canary_start,
        parent=csub,
    )  # fmt: skip
    start.add_argument("version")
    start.add_argument("--share", type=float, help="of conversations (default: the server's)")
    start.add_argument("--judgments", type=int, help="before people decide")
    start.add_argument("--win-rate", type=float, help="the bar for the lower bound")
    command("check", "decide now if enough people judged", _cmd_canary_check, parent=csub)
    stop = command("stop", "end the canary without a decision", _cmd_canary_stop, parent=csub)
    stop.add_argument("--reason", default="stopped by the operator")
