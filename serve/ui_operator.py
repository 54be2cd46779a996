"""The Operator tab: what serves, the job running now, the versions and runs with their metrics,
and the buttons that train, promote and roll back (through `LoopControl`, like the admin API).

The view functions at the top turn store rows into what the components show; they need no
browser. While the tab is shown a timer refreshes the cheap parts every few seconds, and the
rest when something changed (a run ended, the served version moved)."""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import gradio as gr
import pandas as pd

from tuneloop.core.records import ModelVersion, TrainingRun, role_allows
from tuneloop.core.settings import AUTO_JOB, DEFAULT_POLICY_JOB, JOB_KINDS
from tuneloop.feedback import accounts
from tuneloop.feedback.registry import list_versions
from tuneloop.feedback.runs import list_runs
from tuneloop.feedback.store import FEEDBACK_TABLES, FeedbackStore
from tuneloop.loop.control import BusyError, LoopControl
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.rating_desk import RatingDesk
from tuneloop.serve.ui_common import signed_in
from tuneloop.serve.ui_raters import raters_panel

TAB_LABEL = "Operator"
TICK_SECONDS = 2.0
RECENT_RUNS = 20
VERSION_COLUMNS = [
    "id",
    "kind",
    "job",
    "status",
    "reason",
    "parent",
    "snapshot",
    "feedback rows",
    "RM accuracy",
    "win rate",
    "95% CI",
    "KL to parent",
    "length vs served",
    "people",
    "created (UTC)",
]
RUN_COLUMNS = [
    "run",
    "kind",
    "status",
    "stage",
    "progress",
    "version",
    "trigger",
    "started (UTC)",
    "took",
    "error",
]
VERSION_WIDTHS = [
    "8%", "5%", "4%", "7%", "14%", "7%", "9%", "9%", "5%", "5%", "7%", "5%", "8%", "7%",
]  # fmt: skip
RUN_WIDTHS = ["18%", "5%", "6%", "7%", "6%", "7%", "7%", "10%", "5%", "29%"]
# Volume buckets: the finest whose count over the feedback's time span stays readable.
BUCKETS = (("minute", timedelta(hours=3)), ("hour", timedelta(days=7)), ("day", None))

# ---- view functions ------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else ""


def _utc(when: datetime | str | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    return when.astimezone(UTC).strftime(fmt) if when else ""


def _took(run: TrainingRun) -> str:
    if run.finished_at is None:
        return ""
    seconds = (run.finished_at - run.started_at).total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_markdown(status: dict[str, Any]) -> str:
    """The served version (and the registry's, if it differs), the schedule, new feedback."""
    served = status["served_version"]
    lines = [f"Serving model version **{served}**."]
    promoted = status.get("registry_promoted")
    if promoted and promoted != served:
        lines.append(f"The registry's promoted policy is **{promoted}**.")
    s = status["schedule"]
    if s["enabled"]:
        lines.append(
            f"Scheduled training: **{s['kind']}** once {s['min_new_feedback']} new feedback rows "
            f"arrived, at most every {s['every_minutes']:g} min."
        )
    else:
        lines.append("Scheduled training is off.")
    lines.append(f"**{status['new_feedback_rows']}** feedback rows since the last snapshot.")
    canary = status.get("canary")
    if canary:
        v = canary["verdict"]
        so_far = "" if v["win_rate"] is None else f", win rate so far **{v['win_rate']:.2f}**"
        lines.append(
            f"Canary **{canary['version']}** answers {canary['share']:.0%} of conversations: "
            f"{v['judgments']} of {canary['min_judgments']} human judgments{so_far}."
        )
    for flagged in status.get("flagged_canaries") or ():
        lines.append(
            f"⚠ Canary **{flagged['version']}** was {flagged['status']} with judgments of "
            f"{', '.join(flagged['raters'])}, quarantined or disabled since: look at it again."
        )
    return "\n\n".join(lines)


def job_html(runs: list[TrainingRun], busy: bool, now: datetime | None = None) -> str:
    """The running job (newest first in `runs`) with a progress bar, or what the loop does."""
    run = next((r for r in runs if r.status == "running"), None)
    if run is None:
        text = "A training cycle is starting: snapshot and datasets…" if busy else "No job runs."
        return f'<p class="tl-job">{text}</p>'
    pct = round(run.progress * 100)
    elapsed = ((now or datetime.now(UTC)) - run.started_at).total_seconds()
    label = (
        f"<b>{html.escape(run.kind)}</b> · {html.escape(run.stage or 'running')} · {pct}% · "
        f"{elapsed:.0f} s · {html.escape(run.version_id or '')}"
    )
    bar = (
        f'<div role="progressbar" aria-valuenow="{pct}" aria-valuemin="0" aria-valuemax="100" '
        'style="height:12px;border-radius:6px;background:#e5e7eb;overflow:hidden">'
        f'<div style="height:100%;width:{pct}%;background:#f97316"></div></div>'
    )
    return f'<div class="tl-job"><p>Running: {label}</p>{bar}</div>'


def last_cycle_markdown(cycle: dict[str, Any] | None) -> str:
    """The outcome of the last cycle this server ran: promoted, rejected (why), or failed."""
    if cycle is None:
        return "No training cycle has finished since this server started."
    head = f"Last cycle: **{cycle['kind']}** ({cycle.get('trigger')}, {_utc(cycle['finished_at'])})"
    if cycle.get("status") == "failed":
        return f"{head} **failed**: {cycle.get('error')}"
    if cycle["kind"] in JOB_KINDS and not JOB_KINDS[cycle["kind"]].policy:
        return f"{head}: reward model **{cycle.get('reward_version')}** trained."
    if cycle.get("promoted"):
        verdict = "promoted"
    else:
        verdict = "rejected" if cycle.get("gate") else "left as a candidate"
    return f"{head}: **{cycle.get('candidate_version')}** {verdict}: {cycle.get('reason')}"


def _feedback_rows(metrics: dict[str, Any]) -> str:
    counts = metrics.get("feedback_rows")
    if not counts:
        return ""
    return " · ".join(f"{kind} {n}" for kind, n in counts.items() if n) or "none"


def versions_frame(versions: list[ModelVersion]) -> pd.DataFrame:
    """One row per version with its provenance and headline metrics; blank where none."""
    rows = []
    for v in versions:
        gate = v.metrics.get("gate") or {}
        ci = f"[{gate['ci_low']:.2f}, {gate['ci_high']:.2f}]" if "ci_low" in gate else ""
        # The gate writes no KL where the tokenizers differ.
        kl = _num(gate.get("kl_to_parent")) or ("unknown" if gate else "")
        rows.append(
            [
                v.id,
                v.kind,
                v.config.get("job", ""),
                v.status,
                v.status_reason or "",
                v.parent or "",
                v.snapshot_id or "",
                _feedback_rows(v.metrics),
                _num(v.metrics.get("heldout_accuracy")),
                _num(gate.get("win_rate")),
                ci,
                kl,
                _ratio(gate.get("length_ratio")),
                _people(v.metrics.get("human_gate")),
                _utc(v.created_at, "%Y-%m-%d %H:%M"),
            ]
        )
    return pd.DataFrame(rows, columns=VERSION_COLUMNS)


def _ratio(value: float | None) -> str:
    """A length ratio as `1.40x` (blank for gates from before it was measured)."""
    return "" if value is None else f"{value:.2f}x"


def _people(human: dict[str, Any] | None) -> str:
    """The human gate's verdict beside the reward model's: win rate [95% CI] over n."""
    if not human or human.get("win_rate") is None:
        return ""
    rate, low, high, n = (human[k] for k in ("win_rate", "lower", "upper", "judgments"))
    return f"{rate:.2f} [{low:.2f}, {high:.2f}] of {n}"


def runs_frame(runs: list[TrainingRun]) -> pd.DataFrame:
    rows = [
        [
            r.id,
            r.kind,
            r.status,
            r.stage or "",
            f"{r.progress:.0%}",
            r.version_id or "",
            r.trigger or "",
            _utc(r.started_at),
            _took(r),
            r.error or "",
        ]
        for r in runs
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def reward_accuracy_frame(versions: list[ModelVersion]) -> pd.DataFrame:
    """Held-out pair accuracy per reward version, oldest first."""
    rows = [
        [v.id, float(v.metrics["heldout_accuracy"]), v.metrics.get("heldout_pairs")]
        for v in reversed(versions)
        if v.kind == "reward" and isinstance(v.metrics.get("heldout_accuracy"), int | float)
    ]
    return pd.DataFrame(rows, columns=["version", "accuracy", "pairs"])


def gate_frame(versions: list[ModelVersion]) -> pd.DataFrame:
    """Gate win rate and its 95% interval per gated policy version, oldest first (long format:
    one line per series)."""
    rows = []
    for v in reversed(versions):
        gate = v.metrics.get("gate") or {}
        if v.kind != "policy" or "win_rate" not in gate:
            continue
        for series, key in (("win rate", "win_rate"), ("CI low", "ci_low"), ("CI high", "ci_high")):
            if key in gate:
                rows.append([v.id, series, float(gate[key])])
    return pd.DataFrame(rows, columns=["version", "series", "value"])


def volume_bucket(span: timedelta) -> str:
    return next(name for name, most in BUCKETS if most is None or span <= most)


def feedback_volume(store: FeedbackStore) -> tuple[pd.DataFrame, str]:
    """Feedback rows per time bucket and kind, and the bucket chosen from the time span. Buckets
    start on UTC boundaries; the plot shows them in the browser's time zone."""
    union = " UNION ALL ".join(
        f"SELECT '{kind}' AS kind, created_at FROM {table}"
        for kind, table in FEEDBACK_TABLES.items()
    )
    span = store.read(f"SELECT max(created_at) - min(created_at) AS span FROM ({union})")[0]
    bucket = volume_bucket(span["span"] or timedelta(0))
    rows = store.read(
        f"SELECT date_trunc('{bucket}', timezone('UTC', created_at)) AS time, kind, "
        f"count(*) AS rows FROM ({union}) GROUP BY ALL ORDER BY time, kind"
    )
    frame = pd.DataFrame(rows, columns=["time", "kind", "rows"])
    frame["time"] = pd.to_datetime(frame["time"])
    return frame, bucket


def job_choices() -> list[tuple[str, str]]:
    """The Job menu: every job kind, with what it learns from, and `auto`."""
    kinds = [(f"{name}: {kind.learns_from}", name) for name, kind in JOB_KINDS.items()]
    return [*kinds, (f"{AUTO_JOB}: the policy job the feedback calls for", AUTO_JOB)]


def promote_choices(versions: list[ModelVersion]) -> list[tuple[str, str]]:
    return [(f"{v.id} ({v.kind}, {v.status})", v.id) for v in versions if v.status != "promoted"]


# ---- the tab -------------------------------------------------------------------------------------


def operator_tab(
    service: ChatService, control: LoopControl, desk: RatingDesk, principals: Principals
) -> gr.Tab:
    """Build the Operator tab, hidden; call it inside the UI's `gr.Tabs`, whose selection turns
    the polling timer on (this tab) and off (any other), so chat users never poll. The page's
    load shows it to operators (`operator_visibility`); every handler checks the role again."""
    store = service.store
    with gr.Tab(TAB_LABEL, id="operator", visible=False) as tab:
        with gr.Row():
            with gr.Column(scale=3):
                served = gr.Markdown(elem_id="operator-served")
                job = gr.HTML(elem_id="operator-job")
                last = gr.Markdown(elem_id="operator-last-cycle")
            with gr.Column(scale=2, min_width=320):
                with gr.Row(equal_height=True):
                    kind = gr.Dropdown(
                        job_choices(),
                        value=DEFAULT_POLICY_JOB,
                        label="Job",
                    )
                    train = gr.Button("Train now", variant="primary", min_width=110, scale=0)
                with gr.Row(equal_height=True):
                    chosen = gr.Dropdown([], label="Version to promote")
                    promote = gr.Button("Promote", min_width=110, scale=0)
                with gr.Row():
                    rollback = gr.Button("Roll back", variant="stop", min_width=110)
                    refresh = gr.Button("Refresh", min_width=110)
        versions = gr.Dataframe(
            headers=VERSION_COLUMNS,
            label="Model versions (newest first)",
            wrap=True,
            column_widths=VERSION_WIDTHS,
        )
        runs = gr.Dataframe(
            headers=RUN_COLUMNS,
            label="Training runs (newest first)",
            wrap=True,
            column_widths=RUN_WIDTHS,
        )
        with gr.Row():
            rm_plot = gr.LinePlot(
                x="version",
                y="accuracy",
                title="Reward model: held-out pair accuracy",
                y_lim=[0, 1],
                tooltip="all",
            )
            gate_plot = gr.LinePlot(
                x="version",
                y="value",
                color="series",
                title="Policy gate: win rate vs. the served policy (95% CI)",
                color_map={"win rate": "#f97316", "CI low": "#9ca3af", "CI high": "#9ca3af"},
                y_lim=[0, 1],
                tooltip="all",
            )
        volume_plot = gr.BarPlot(x="time", y="rows", color="kind", title="Feedback volume")
        timer = gr.Timer(TICK_SECONDS, active=False)
        seen = gr.State(None)  # what the heavy outputs were last built from
        raters_panel(desk, principals, control.trust)

    live_out = [served, job, last, runs]
    full_out = [versions, chosen, rm_plot, gate_plot, volume_plot]
    outputs = [*live_out, *full_out, seen]

    def view(previous: Any, picked: str | None, force: bool) -> list[Any]:
        """Every output; the versions and plots only when `force` or something changed."""
        status = control.status()
        recent = list_runs(store, RECENT_RUNS)
        key = (
            status["served_version"],
            status["registry_promoted"],
            status["busy"],
            [(r.id, r.status) for r in recent[:1]],
        )
        live = [
            status_markdown(status),
            job_html(recent, status["busy"]),
            last_cycle_markdown(status["last_cycle"]),
            runs_frame(recent),
        ]
        if not force and key == previous:
            return [*live, *(gr.skip(),) * len(full_out), gr.skip()]
        all_versions = list_versions(store)
        choices = promote_choices(all_versions)
        volume, bucket = feedback_volume(store)
        return [
            *live,
            versions_frame(all_versions),
            gr.Dropdown(choices, value=picked if picked in dict(choices).values() else None),
            reward_accuracy_frame(all_versions),
            gate_frame(all_versions),
            gr.BarPlot(volume, y_title=f"rows per {bucket}"),
            key,
        ]

    def act(
        action: Callable[[str], str], picked: str | None, request: gr.Request, audited: str
    ) -> list[Any]:
        """Run `action(operator's name)` for a signed-in operator, audited; say how it went."""
        account = signed_in(principals, request, "operator")
        if account is None:
            return [gr.skip()] * len(outputs)
        try:
            gr.Info(action(account.name))
            accounts.audit(store, account.name, audited, picked, via="ui")
        except (BusyError, ValueError) as exc:  # RegistryError is a ValueError
            gr.Warning(str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. weights that fail to load: say so
            control.log(f"operator action failed: {exc!r}")
            gr.Warning(f"Failed: {exc}")
        return view(None, picked, force=True)

    def on_train(job_kind: str, picked: str | None, request: gr.Request) -> list[Any]:
        def start(_: str) -> str:
            control.train_now(job_kind)
            return f"Started a {job_kind} training cycle."

        return act(start, picked, request, f"train {job_kind}")

    def on_promote(picked: str | None, request: gr.Request) -> list[Any]:
        def run(name: str) -> str:
            if not picked:
                raise ValueError("Pick a version to promote first.")
            promoted = control.promote(picked, f"promoted by {name} in the UI")
            return f"Promoted {promoted.id}; serving {control.serving.version}."

        return act(run, picked, request, "promote")

    def on_rollback(picked: str | None, request: gr.Request) -> list[Any]:
        def run(name: str) -> str:
            return f"Rolled back: serving {control.rollback(f'rolled back by {name}').id}."

        return act(run, picked, request, "rollback")

    def on_tab(picked: str | None, evt: gr.SelectData, request: gr.Request) -> list[Any]:
        if evt.value != TAB_LABEL or signed_in(principals, request, "operator") is None:
            return [*(gr.skip(),) * len(outputs), gr.Timer(active=False)]
        return [*view(None, picked, force=True), gr.Timer(active=True)]

    def on_tick(previous: Any, picked: str | None, request: gr.Request) -> list[Any]:
        if signed_in(principals, request, "operator") is None:
            return [gr.skip()] * len(outputs)
        return view(previous, picked, False)

    def on_refresh(picked: str | None, request: gr.Request) -> list[Any]:
        if signed_in(principals, request, "operator") is None:
            return [gr.skip()] * len(outputs)
        return view(None, picked, True)

    tabs = tab.parent
    if not isinstance(tabs, gr.Tabs):
        raise TypeError("operator_tab() builds a gr.Tab: call it inside gr.Tabs")
    quiet = {"queue": False, "show_progress": "hidden"}
    timer.tick(on_tick, [seen, chosen], outputs, **quiet)
    tabs.select(on_tab, chosen, [*outputs, timer], **quiet)
    refresh.click(on_refresh, chosen, outputs)
    train.click(on_train, [kind, chosen], outputs)
    # One swap at a time, across both buttons and every session.
    swap = {"concurrency_limit": 1, "concurrency_id": "operator-swap"}
    promote.click(on_promote, chosen, outputs, **swap)
    rollback.click(on_rollback, chosen, outputs, **swap)
    return tab


def operator_visibility(principals: Principals) -> Callable[[gr.Request], gr.Tab]:
    """The page-load handler that shows the Operator tab to operators and admins only."""

    def show(request: gr.Request) -> gr.Tab:
        # The session's account (`serve.sessions`), not just the name Gradio knows it by.
        sessions = principals.sessions
        account = sessions.account_of(request) if sessions is not None else None
        return gr.Tab(visible=account is not None and role_allows(account.role, "operator"))

    return show
