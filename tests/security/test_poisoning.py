"""Poisoning through the scheduled loop, on a real server (127.0.0.1): 500 edits steering answers
toward a URL from a quarantined account neither start a training cycle nor reach the snapshot
that the next cycle (started by honest feedback) trains on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.settings import GateSettings, LimitSettings, ScheduleSettings

URL = "http://evil.example/claim"
POISON = 500
HONEST = 24


def chat_and_edit(server: LiveServer, headers: dict, i: int, text: str) -> None:
    body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 2}
    answer = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ).raise_for_status()
    edit = {"kind": "edit", "response_id": int(answer.json()["id"]), "text": text}
    httpx.post(
        f"{server.url}/v1/feedback", json=edit, headers=headers, timeout=60
    ).raise_for_status()


def loop_state(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/v1/admin/loop", headers=server.auth, timeout=60).json()


@pytest.mark.slow
def test_a_quarantined_flood_starts_no_cycle_and_stays_out_of_the_next(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    schedule = ScheduleSettings(
        enabled=True, min_new_feedback=HONEST, every_minutes=0.0, poll_seconds=0.5
    )
    gate = GateSettings(min_win_rate=0.0, max_prompts=8, max_tokens=8)
    for server in live_server(
        tmp_path / "data",
        tiny_model_dir,
        ui=False,
        schedule=schedule,
        gate=gate,
        limits=LimitSettings(0, 0),
    ):
        mallory, gina = server.account("mallory"), server.account("gina")
        # A user's edits become training targets only once an operator trusts them.
        trusted = httpx.post(f"{server.url}/v1/admin/users/gina/trust", headers=server.auth)
        assert trusted.json()["trusted"] is True
        quarantined = httpx.post(
            f"{server.url}/v1/admin/raters/quarantine",
            json={"names": ["mallory"], "reason": "floods edits with a link"},
            headers=server.auth,
        )
        assert quarantined.json()["quarantined"] == ["mallory"]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(partial(chat_and_edit, server, mallory, text=URL), range(POISON)))
        time.sleep(3)  # six polls of the scheduler
        state = loop_state(server)
        assert state["new_feedback_rows"] == 0 and state["last_cycle"] is None

        for i in range(HONEST):
            chat_and_edit(server, gina, 1000 + i, f"A plain, honest answer number {i}.")
        deadline = time.monotonic() + 600
        while (cycle := loop_state(server)["last_cycle"]) is None or "finished_at" not in cycle:
            assert time.monotonic() < deadline, "no scheduled cycle ran"
            time.sleep(1)
        assert cycle["trigger"] == "schedule" and cycle["status"] == "done", cycle

        (snap_path,) = (
            duckdb.connect(str(server.data_dir.db)).execute("SELECT path FROM snapshots").fetchone()
        )
        snap = Path(snap_path)
        with duckdb.connect() as con:
            edits = con.execute(f"SELECT rater_id, text FROM '{snap / 'edits.parquet'}'").fetchall()
            assert len(edits) == HONEST and {r for r, _ in edits} == {"gina"}
            for name in ("preference", "sft"):
                for split in ("train", "heldout"):
                    path = snap / "datasets" / f"{name}.{split}.parquet"
                    found = con.execute(
                        f"SELECT count(*) FROM '{path}' WHERE CAST(COLUMNS(*) AS VARCHAR) "
                        f"LIKE '%evil.example%'"
                    ).fetchall()
                    assert all(n == 0 for row in found for n in row), (name, split)
        manifest = httpx.get(
            f"{server.url}/v1/admin/versions", headers=server.auth, timeout=60
        ).json()
        assert any(v["snapshot_id"] == snap.name for v in manifest)
