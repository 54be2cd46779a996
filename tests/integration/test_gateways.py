"""Two `tuneloop gateway` processes in front of one primary `tuneloop up`, which owns the store:
chat and feedback through either land in the primary's DuckDB file, accounts are the primary's,
the gateways follow its promotions, and a gateway killed with SIGKILL under load loses no
acknowledged feedback row."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_client import ask, gateway
from live_server import LiveServer, live_server
from loop_client import admin, db_rows

from tuneloop.core.config import DataDir
from tuneloop.core.settings import LimitSettings
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.gateway_api import rotate_gateway_token


@pytest.fixture(scope="module")
def primary(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model_dir_b: Path
) -> Iterator[LiveServer]:
    """policy-v1: other weights, to promote; policy-v2: served first."""
    dd = DataDir(tmp_path_factory.mktemp("gateways") / "data")
    with FeedbackStore(dd.db) as store:
        for model in (tiny_model_dir_b, tiny_model_dir):
            ensure_served_policy(store, str(model), str, reason="served by the test")
    # No feedback limit: the load test's raters vote as fast as they can.
    yield from live_server(dd.root, None, ui=False, limits=LimitSettings(feedback_per_minute=0))


@pytest.fixture(scope="module")
def gateways(primary: LiveServer) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    with gateway(primary) as a, gateway(primary) as b:
        yield [a, b]


def accounts(primary: LiveServer, urls: list[str], *names: str) -> list[dict[str, str]]:
    """Users made on the primary, once every gateway in `urls` knows them (they read the
    primary's accounts every 2 s)."""
    made = [primary.account(name, "user") for name in names]
    deadline = time.monotonic() + 10
    for url in urls:
        for headers in made:
            while httpx.get(f"{url}/v1/models", headers=headers).status_code != 200:
                assert time.monotonic() < deadline, f"{url} does not know an account yet"
                time.sleep(0.1)
    return made


def account(primary: LiveServer, urls: list[str], name: str) -> dict[str, str]:
    return accounts(primary, urls, name)[0]


def test_answers_and_feedback_through_either_gateway_land_in_the_primary(
    primary: LiveServer, gateways: list
) -> None:
    (a, _), (b, _) = gateways
    ann = account(primary, [a, b], "ann")
    first, second = ask(a, ann), ask(b, ann)
    assert first["model"] == second["model"] == "policy-v2"
    assert first["id"] != second["id"]
    # Feedback on an answer another gateway gave: the primary's store knows it.
    r = httpx.post(
        f"{b}/v1/feedback",
        json={"kind": "rating", "response_id": int(first["id"]), "value": 4},
        headers=ann,
    )
    assert r.status_code == 201, r.text
    rows = db_rows(
        primary.data_dir, "SELECT rater_id, score FROM ratings WHERE id = ?", [r.json()["id"]]
    )
    assert rows == [("ann", 4)]
    stored = db_rows(
        primary.data_dir,
        "SELECT id, rater_id, model_version_id FROM responses WHERE id IN (?, ?) ORDER BY id",
        [int(first["id"]), int(second["id"])],
    )
    assert [(r[1], r[2]) for r in stored] == [("ann", "policy-v2")] * 2
    # A conversation goes on through the other gateway.
    body = {
        "messages": [{"role": "user", "content": "and then?"}],
        "max_tokens": 4,
        "conversation_id": first["conversation_id"],
    }
    r = httpx.post(f"{b}/v1/chat/completions", json=body, headers=ann, timeout=60)
    assert r.status_code == 200 and r.json()["conversation_id"] == first["conversation_id"]
    # Someone else's answer, or an unknown one, is refused as on the primary.
    bob = account(primary, [a], "bob")
    theirs = {"kind": "thumbs", "response_id": int(first["id"]), "value": 1}
    assert httpx.post(f"{a}/v1/feedback", json=theirs, headers=bob).status_code == 403
    unknown = {"kind": "thumbs", "response_id": 10**9, "value": 1}
    assert httpx.post(f"{a}/v1/feedback", json=unknown, headers=bob).status_code == 404


def test_accounts_are_the_primarys_and_gateway_routes_take_the_gateway_token(
    primary: LiveServer, gateways: list
) -> None:
    (a, _), _ = gateways
    assert httpx.get(f"{a}/v1/models").status_code == 401
    assert httpx.get(f"{primary.url}/v1/gateway/accounts", headers=primary.auth).status_code == 401
    carl = account(primary, [a], "carl")
    ask(a, carl)
    with admin(primary) as api:
        assert api.post("/v1/admin/users/carl/disable").status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(f"{a}/v1/models", headers=carl).status_code != 401:
        assert time.monotonic() < deadline, "a disabled account still signs in at the gateway"
        time.sleep(0.2)
    # Operator routes are not served by a gateway.
    assert httpx.get(f"{a}/v1/admin/versions", headers=primary.auth).status_code == 404
    # A new gateway token: the gateway reads its file again and goes on, unrestarted.
    rotate_gateway_token(primary.data_dir)
    dora = account(primary, [a], "dora")
    answer = ask(a, dora)["id"]
    thumbs = {"kind": "thumbs", "response_id": int(answer), "value": 1}
    assert httpx.post(f"{a}/v1/feedback", json=thumbs, headers=dora).status_code == 201


def test_an_accounts_limits_hold_across_the_primary_and_a_gateway(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """6 answers and 6 feedback rows a minute per user: asked in turn through the primary and a
    gateway, an account gets 6 of each (and what its buckets refilled meanwhile, one each
    10 s), not 6 at each server; over the limit, either answers 429 with `Retry-After`."""
    limits = LimitSettings(chats_per_minute=6, feedback_per_minute=6)
    for primary in live_server(tmp_path / "data", tiny_model_dir, ui=False, limits=limits):
        with gateway(primary) as (url, _), httpx.Client(timeout=60) as http:
            servers = [primary.url, url]
            eve = account(primary, [url], "eve")
            answer = ask(url, eve)["id"]  # one of the 6 answers
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            rating = {"kind": "rating", "response_id": int(answer), "value": 4}
            for route, body, done, first in (
                ("/v1/chat/completions", chat, 200, 1),
                ("/v1/feedback", rating, 201, 0),
            ):
                started, taken, refused = time.monotonic(), first, {}
                for n in range(40):
                    r = http.post(f"{servers[n % 2]}{route}", json=body, headers=eve)
                    if r.status_code == done:
                        taken += 1
                        continue
                    assert r.status_code == 429, r.text
                    assert int(r.headers["Retry-After"]) >= 1
                    assert "limit of 6" in r.json()["error"]["message"]
                    refused[servers[n % 2]] = True
                elapsed = time.monotonic() - started
                assert 6 <= taken <= 6 + elapsed / 10 + 1, (route, taken, elapsed)
                assert len(refused) == 2, (route, refused)


def test_gateways_follow_the_primarys_promotion(primary: LiveServer, gateways: list) -> None:
    dan = account(primary, [url for url, _ in gateways], "dan")
    with admin(primary) as api:
        assert api.post("/v1/admin/promote", json={"version": "policy-v1"}).status_code == 200
    try:
        for url, _ in gateways:
            deadline = time.monotonic() + 30
            while ask(url, dan)["model"] != "policy-v1":
                assert time.monotonic() < deadline, f"{url} still serves policy-v2"
                time.sleep(0.2)
    finally:
        with admin(primary) as api:
            assert api.post("/v1/admin/promote", json={"version": "policy-v2"}).status_code == 200


@pytest.mark.slow
def test_a_gateway_killed_under_load_loses_no_acknowledged_feedback(primary: LiveServer) -> None:
    """16 clients on each gateway rate their own answers back to back; gateway 0 gets SIGKILL
    once each has had a few ratings acknowledged, and its clients go on through gateway 1.
    Every rating acknowledged to a client is in the primary's file afterwards (the last one for
    each answer: a vote replaces)."""
    with gateway(primary) as (url_a, proc_a), gateway(primary) as (url_b, _):
        made = accounts(primary, [url_a, url_b], *(f"load-{i}" for i in range(32)))
        clients = [
            (headers, int(ask(url_a, headers)["id"]), url_a if i < 16 else url_b)
            for i, headers in enumerate(made)
        ]
        acked: dict[int, int] = {}  # answer -> id of the last rating acknowledged
        # Ratings acknowledged per answer through each gateway (each answer's client alone
        # counts its own).
        taken: dict[str, Counter[int]] = {url_a: Counter(), url_b: Counter()}
        errors: list[str] = []
        stop = threading.Event()

        def rate(headers: dict[str, str], answer: int, url: str) -> None:
            n = 0
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    n += 1
                    body = {"kind": "rating", "response_id": answer, "value": 1 + n % 5}
                    try:
                        r = http.post(f"{url}/v1/feedback", json=body, headers=headers)
                    except httpx.TransportError:
                        url = url_b  # gateway 0 is gone: go on through the other one
                        continue
                    if r.status_code == 201:
                        acked[answer] = r.json()["id"]
                        taken[url][answer] += 1
                    elif r.status_code != 503:
                        errors.append(r.text)

        threads = [threading.Thread(target=rate, args=c) for c in clients]

        def each_has(n: int, url: str, of: list[tuple[dict[str, str], int, str]]) -> None:
            """Wait until each client in `of` has `n` ratings acknowledged through `url`."""
            deadline = time.monotonic() + 60
            while min(taken[url][answer] for _, answer, _ in of) < n:
                assert not errors, errors
                assert time.monotonic() < deadline, f"clients stalled on {url}: {taken[url]}"
                time.sleep(0.05)

        for t in threads:
            t.start()
        try:
            # Load through both gateways; gateway 0 killed; its clients go on through 1.
            each_has(3, url_a, clients[:16])
            each_has(3, url_b, clients[16:])
            os.kill(proc_a.pid, signal.SIGKILL)
            each_has(3, url_b, clients[:16])
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert errors == []
    assert len(acked) == 32
    stored = dict(
        db_rows(
            primary.data_dir,
            "SELECT response_id, id FROM ratings WHERE list_contains(?, response_id)",
            [list(acked)],
        )
    )
    assert stored == acked
