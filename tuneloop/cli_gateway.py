"""`tuneloop gateway`: one more server in front of the engine, recording into the primary's store
(`tuneloop.serve.gateway`); `tuneloop gateway token`: a new gateway token."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from tuneloop.cli_engine import add_engine_arguments, vllm_settings
from tuneloop.core.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_MAX_CONCURRENCY,
    DataDir,
    ServeConfig,
)

DEFAULT_GATEWAY_PORT = 7870


def add_gateway_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--primary",
        metavar="URL",
        help="the `tuneloop up` server that owns the store (default: the one running on "
        "--data-dir)",
    )
    p.add_argument(
        "--gateway-token-file",
        metavar="FILE",
        help="the primary's gateway token (default: <data-dir>/gateway.token, which the "
        "primary writes at its first start)",
    )
    add_engine_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    p.add_argument("--port", type=int, default=DEFAULT_GATEWAY_PORT, help="default: %(default)s")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="answers generated at once (default: %(default)s)",
    )
    actions = p.add_subparsers(
        dest="gateway_action", metavar="[ACTION]", title="actions (without one, serve)"
    )
    token_help = (
        "write a new gateway token to <data-dir>/gateway.token (0600): a running primary "
        "reads the file again when it changes, so the old token is refused from its next "
        "gateway request on, and gateways that read the same file (--gateway-token-file) "
        "use the new token from their next request; copy it to gateways on other machines"
    )
    token = actions.add_parser("token", help=token_help, description=token_help)
    token.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,  # else this default would win over `gateway --data-dir`
        help=f"the primary's data dir (default: {DEFAULT_DATA_DIR})",
    )
    token.set_defaults(fn=cmd_gateway_token)


def cmd_gateway(args: argparse.Namespace) -> int:
    from tuneloop.serve.gateway import GatewayConfig, run_gateway

    dd = DataDir(args.data_dir)
    primary = args.primary or _running_primary(dd)
    token_file = Path(args.gateway_token_file or dd.gateway_token_file)
    try:
        token_file.read_text()
    except OSError as exc:
        raise SystemExit(f"tuneloop: cannot read the gateway token: {exc}") from None
    vllm = vllm_settings(args)
    if args.engine == "vllm" and not vllm.urls:
        raise SystemExit("tuneloop: a gateway attaches to the primary's replicas: give --vllm-url")
    serve = ServeConfig(
        dd,
        engine=args.engine,
        vllm=vllm,
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
        ui=False,
    )

    def ready(url: str) -> None:
        print(f"tuneloop: gateway at {url}, recording into {primary}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        run_gateway(GatewayConfig(primary, token_file, serve), on_ready=ready)
    return 0


def cmd_gateway_token(args: argparse.Namespace) -> int:
    from tuneloop.serve.gateway_api import rotate_gateway_token

    path = rotate_gateway_token(DataDir(args.data_dir))
    print(
        f"tuneloop: wrote a new gateway token to {path}; a running primary takes it at its next "
        "gateway request, and so do gateways reading this file; copy it to gateways elsewhere",
        flush=True,
    )
    return 0


def _running_primary(dd: DataDir) -> str:
    try:
        info: dict[str, Any] = json.loads(dd.server_file.read_text())
    except (OSError, ValueError):
        print(f"tuneloop: no server runs on {dd.root}; give --primary URL", file=sys.stderr)
        raise SystemExit(2) from None
    return str(info["url"])
