"""Assembles and runs one server process: store, engine, chat service, API and UI on one port."""

from __future__ import annotations

import gc
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI

from tuneloop.core.config import DataDir, ServeConfig
from tuneloop.core.files import write_json_atomic
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import DEFAULT_MODEL, LimitSettings
from tuneloop.core.web_settings import WebSettings
from tuneloop.feedback.accounts import FIRST_ADMIN, ensure_first_admin, token_index
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore
from tuneloop.loop.control import LoopControl
from tuneloop.serve.admin import create_admin_router
from tuneloop.serve.admin_users import create_users_router
from tuneloop.serve.api import create_api
from tuneloop.serve.auth import Principals
from tuneloop.serve.canary import CanaryServing
from tuneloop.serve.canary_api import create_canary_router
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.engine import EmbeddedEngine, Engine
from tuneloop.serve.gateway_api import create_gateway_router
from tuneloop.serve.limits import Limits
from tuneloop.serve.rating_desk import RatingDesk, TaskRefill
from tuneloop.serve.sessions import Sessions, SignInLimit, mounted_gradio
from tuneloop.serve.tasks_api import create_raters_router, create_tasks_router
from tuneloop.serve.web_security import WebGuard


def open_engine(config: ServeConfig, version: ModelVersion) -> Engine:
    """The engine `config` names, serving `version`; for vLLM, the server is started (or
    reached) first and stopped again if the engine cannot be set up."""
    if config.engine == "embedded":
        return EmbeddedEngine(
            version.artifact_path,
            version.id,
            device=config.device,
            max_concurrency=config.max_concurrency,
        )
    from tuneloop.serve.vllm_open import open_vllm

    return open_vllm(config.vllm, config.data_dir.root / "vllm", version, config.max_concurrency)


def build_app(
    service: ChatService,
    control: LoopControl,
    desk: RatingDesk,
    data_dir: DataDir,
    *,
    with_ui: bool = True,
    limits: LimitSettings | None = None,
    file_dirs: tuple[Path, ...] = (),
    web: WebSettings | None = None,
) -> FastAPI:
    web = web or WebSettings()
    limits = Limits.of(limits or LimitSettings())
    principals = Principals(lambda: token_index(service.store))
    remove_at_first_sign_in(principals, data_dir.admin_token_file)
    app = create_api(service, principals, limits)
    app.include_router(create_admin_router(service, control, data_dir, principals, file_dirs))
    app.include_router(create_users_router(service.store, principals, desk.reload))
    app.include_router(create_tasks_router(desk, principals, limits))
    app.include_router(create_raters_router(desk, principals, control.trust, control.score_tasks))
    app.include_router(create_canary_router(control, principals))
    app.include_router(create_gateway_router(service, data_dir, principals, limits))
    if with_ui:
        import gradio as gr

        from tuneloop.serve.ui import build_ui

        sessions = Sessions(principals, web.session_idle_s, web.session_max_s)
        principals.sessions = sessions
        app = gr.mount_gradio_app(
            app,
            build_ui(service, control, desk, principals, limits),
            path="/",
            auth=sessions.check_password,
            auth_message="Sign in with your account's name and token (`tuneloop users add`).",
            # Gradio's app would serve its own /openapi.json to anyone (its API's description
            # is at /gradio_api/info, behind the sign-in).
            app_kwargs={"openapi_url": None},
        )
        sessions.install(mounted_gradio(app))
        app.add_middleware(SignInLimit, limiter=limits.logins)
    return guarded(app, web)


def guarded(app: FastAPI, web: WebSettings) -> FastAPI:
    """`app` with the web's defences (`serve.web_security`) and without its API docs unless
    `web.api_docs`: the primary's, and each gateway's."""
    if not web.api_docs:
        hide_api_docs(app)
    # Added last, so outermost: it resolves the client for the sign-in limit, and answers first.
    app.add_middleware(
        WebGuard, allowed_origins=web.allowed_origins, trusted_proxies=web.proxy_networks()
    )
    return app


def hide_api_docs(app: FastAPI) -> None:
    """Take FastAPI's /docs, /redoc and /openapi.json off `app`: they describe every route to
    anyone, signed in or not (`tuneloop up --api-docs` keeps them)."""
    hidden = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in hidden]
    app.openapi_url = app.docs_url = app.redoc_url = None


def log(message: str) -> None:
    print(f"[tuneloop] {message}", flush=True)


def open_canary_engine(config: ServeConfig, served: Engine) -> Callable[[ModelVersion], Engine]:
    """How a canary gets an engine of its own beside the served one: another embedded engine,
    or on vLLM, another adapter on the same server (`VllmEngine.canary`)."""

    def open_canary(version: ModelVersion) -> Engine:
        if config.engine == "embedded":
            return open_engine(config, version)
        return served.canary(version.id, version.artifact_path)  # type: ignore[attr-defined]

    return open_canary


def create_control(config: ServeConfig, service: ChatService) -> LoopControl:
    return LoopControl(
        config.data_dir,
        service.store,
        CanaryServing(service, log, open_canary_engine(config, service.engine)),
        log=log,
        schedule=config.schedule,
        gate=config.gate,
        trust=config.trust,
        tasks=config.tasks,
    )


def first_admin(store: FeedbackStore, data_dir: DataDir) -> None:
    """On a data dir without an admin: make one, print its token to the log and write it to
    `admin.token` (which only the data dir's owner may read) for a first sign-in; the file goes
    at that sign-in (`remove_at_first_sign_in`)."""
    token = ensure_first_admin(store)
    if token is None:
        return
    data_dir.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(data_dir.admin_token_file, 0o600)  # O_CREAT's mode does not apply to an old file
    log(
        f"made the first account, {FIRST_ADMIN!r} (admin), whose token is {token} (shown once; "
        f"also in {data_dir.admin_token_file} until its first sign-in, which removes the file); "
        "`tuneloop users add NAME --role user|rater|operator` makes accounts for others"
    )


def remove_at_first_sign_in(principals: Principals, token_file: Path) -> None:
    """Remove the first admin's token file at the first sign-in with it (the UI, or an API call
    such as the CLI's): a secret that has been used has no business on disk. A file left by an
    earlier start that no one signed in with goes the same way."""
    try:
        token = token_file.read_text().strip()
    except FileNotFoundError:
        return

    def remove() -> None:
        token_file.unlink(missing_ok=True)
        log(
            f"removed {token_file}: its token has signed in; the CLI now needs "
            "TUNELOOP_TOKEN while this server runs"
        )

    if token:
        principals.when_first_used(token, remove)


def run_server(
    config: ServeConfig,
    resolve_model: Callable[[str], str],
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until interrupted (or until `stop` is set); the store is closed cleanly on exit.

    `resolve_model` turns a model spec (`config.model`, else the default model when nothing is
    promoted yet) into a checkpoint path (`tuneloop.models.resolve_model` fetches and caches)."""
    dd = config.data_dir
    dd.restrict()
    store = FeedbackStore(dd.db)
    control: LoopControl | None = None
    engine: Engine | None = None
    refill: TaskRefill | None = None
    try:
        version = ensure_served_policy(
            store,
            config.model,
            resolve_model,
            reason="served by `tuneloop up --model {model}`",
            default=DEFAULT_MODEL,
        )
        engine = open_engine(config, version)
        service = ChatService(engine, store)
        control = create_control(config, service)
        first_admin(store, dd)
        desk = RatingDesk(service, config.tasks, config.trust)
        if config.tasks.backlog:
            refill = TaskRefill(desk, log)
        app = build_app(
            service,
            control,
            desk,
            dd,
            with_ui=config.ui,
            limits=config.limits,
            file_dirs=config.file_dirs,
            web=config.web,
        )

        def ready(url: str) -> None:
            info = {"url": url, "pid": os.getpid(), "model_version": version.id}
            write_json_atomic(dd.server_file, info)
            if on_ready is not None:
                on_ready(url)

        serve_app(app, config.host, config.port, ready, stop)
    finally:
        dd.server_file.unlink(missing_ok=True)
        if refill is not None:
            refill.close()
        if control is not None:
            control.close()
        if engine is not None:
            engine.close()  # a vLLM server tuneloop started stops with it
        store.close()


def serve_app(
    app: FastAPI,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run `app` with uvicorn until interrupted (or until `stop` is set); `on_ready(url)` once
    it listens."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            # X-Forwarded-* are believed from --trusted-proxy peers only (`web_security`);
            # uvicorn's own handling would believe any local peer.
            proxy_headers=False,
        )
    )
    watcher = threading.Thread(target=_announce, daemon=True, args=(server, on_ready, stop))
    watcher.start()
    # torch and transformers leave ~400k tracked objects; a full GC pass over them took
    # ~240 ms under load (the feedback p99). Freeze them out of the collector.
    gc.collect()
    gc.freeze()
    server.run()


def _announce(
    server: object, on_ready: Callable[[str], None] | None, stop: threading.Event | None
) -> None:
    """Once uvicorn listens: report the URL; then honour stop."""
    while not getattr(server, "started", False):
        if getattr(server, "should_exit", False):
            return
        threading.Event().wait(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    if stop is not None:
        stop.wait()
        server.should_exit = True  # type: ignore[attr-defined]


@contextmanager
def server_in_thread(
    config: ServeConfig,
    resolve_model: Callable[[str], str],
    *,
    start_timeout: float = 120,
    stop_timeout: float = 30,
) -> Iterator[str]:
    """`run_server` in a daemon thread of this process (`tuneloop simulate`, the tests): yields
    its URL once it listens, and stops it on exit. A failure to start is raised here."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_server(config, resolve_model, ready.put, stop)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller below
            errors.append(exc)
            ready.put("")

    thread = threading.Thread(target=run, daemon=True, name="tuneloop-server")
    thread.start()
    url = ready.get(timeout=start_timeout)
    if errors:
        raise errors[0]
    try:
        yield url
    finally:
        stop.set()
        thread.join(timeout=stop_timeout)
