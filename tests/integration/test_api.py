"""The HTTP API on a real server (127.0.0.1), driven by the official `openai` client and httpx."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import openai
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.web_settings import WebSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """With the API's docs, which `test_openapi_schema_describes_the_contract` reads."""
    data = tmp_path_factory.mktemp("api") / "data"
    yield from live_server(data, tiny_model_dir, ui=False, web=WebSettings(api_docs=True))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)


def ask(client: openai.OpenAI, text: str = "What is a tuple?", **kw: object):
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": text}], max_tokens=12, **kw
    )


def db_rows(server: LiveServer, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(sql, params or []).fetchall()


def test_health_names_the_served_version(server: LiveServer) -> None:
    body = httpx.get(f"{server.url}/health").json()
    assert body == {"status": "ok", "model_version": "policy-v1"}


def test_completion_id_is_the_stored_response(server: LiveServer, client: openai.OpenAI) -> None:
    r = ask(client)
    assert r.model == "policy-v1"
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    stored = db_rows(
        server,
        "SELECT text, model_version_id, completion_tokens, params FROM responses WHERE id = ?",
        [int(r.id)],
    )
    assert stored[0][:3] == (r.choices[0].message.content, "policy-v1", r.usage.completion_tokens)
    assert '"max_tokens": 12' in stored[0][3]


def test_streaming_gives_the_same_stored_text(server: LiveServer, client: openai.OpenAI) -> None:
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= 1
    # The stream may end before its response commits; feedback sent right away still finds it,
    # and is acknowledged only after both are committed.
    response_id = int(ids.pop())
    vote = httpx.post(
        f"{server.url}/v1/feedback",
        json={"response_id": response_id, "kind": "thumbs", "value": 1},
        headers=server.auth,
    )
    assert vote.status_code == 201, vote.text
    stored = db_rows(server, "SELECT text FROM responses WHERE id = ?", [response_id])
    assert stored == [(text,)]


def test_conversations_continue_and_unknown_ones_are_refused(
    server: LiveServer, client: openai.OpenAI
) -> None:
    first = ask(client, "hi")
    conv = first.model_extra["conversation_id"]
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "go on"},
    ]
    second = client.chat.completions.create(
        model="any", messages=history, max_tokens=5, extra_body={"conversation_id": conv}
    )
    assert second.model_extra["conversation_id"] == conv
    roles = db_rows(
        server, "SELECT idx, role FROM messages WHERE conversation_id = ? ORDER BY idx", [conv]
    )
    assert roles == [(0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    with pytest.raises(openai.NotFoundError, match="unknown conversation"):
        client.chat.completions.create(
            model="any", messages=history, max_tokens=5, extra_body={"conversation_id": 10**9}
        )


def test_bad_chat_requests_get_clear_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model="any", messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        ask(client, temperature=9)
    with pytest.raises(openai.BadRequestError, match="prompt is .* tokens"):
        ask(client, "word " * 5000)


def test_every_feedback_kind_is_acknowledged_after_commit(
    server: LiveServer, client: openai.OpenAI
) -> None:
    a, b, c = (int(ask(client, "Rank these").id) for _ in range(3))
    bodies = [
        {"kind": "thumbs", "response_id": a, "value": 1, "rater": "admin"},
        {"kind": "rating", "response_id": a, "value": 5, "reason": "clear"},
        {"kind": "edit", "response_id": b, "text": "A better answer."},
        {"kind": "comparison", "response_ids": [a, b], "winner": "tie"},
        {"kind": "ranking", "response_ids": [c, a, b]},
    ]
    before = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    for body in bodies:
        resp = httpx.post(f"{server.url}/v1/feedback", json=body, headers=server.auth)
        assert resp.status_code == 201, resp.text
        assert resp.json()["kind"] == body["kind"]
        table = {
            "thumbs": "thumbs",
            "rating": "ratings",
            "edit": "edits",
            "comparison": "comparisons",
            "ranking": "rankings",
        }[body["kind"]]
        assert db_rows(
            server, f"SELECT count(*) FROM {table} WHERE id = ?", [resp.json()["id"]]
        ) == [(1,)]
    after = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    for body in bodies:
        assert after[body["kind"]] == before[body["kind"]] + 1


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"kind": "thumbs", "response_id": 10**9, "value": 1}, 404, "unknown response id"),
        ({"kind": "thumbs", "response_id": "{a}", "value": 2}, 422, "thumbs value must be 1 or -1"),
        ({"kind": "rating", "response_id": "{a}", "value": 0}, 422, "from 1 to 5, got 0"),
        ({"kind": "edit", "response_id": "{a}", "text": "x" * 40_000}, 422, "the limit is 32000"),
        ({"kind": "edit", "response_id": "{a}", "text": ""}, 422, "edit text is empty: an edit"),
        ({"kind": "edit", "response_id": "{a}", "text": "  "}, 422, "edit text is empty: an edit"),
        ({"kind": "comparison", "response_ids": ["{a}"], "winner": "a"}, 422, "at least 2"),
        ({"kind": "comparison", "response_ids": ["{a}", "{a}"], "winner": "a"}, 422, "different"),
        ({"kind": "comparison", "response_ids": ["{a}", 10**9], "winner": "c"}, 422, "winner must"),
        ({"kind": "ranking", "response_ids": ["{a}"] * 17}, 422, "2 to 16 responses, got 17"),
        ({"kind": "ranking", "response_ids": ["{a}", 10**9]}, 404, "unknown response id"),
        ({"kind": "stars", "response_id": "{a}"}, 422, "does not match any of the expected tags"),
        ({"kind": "thumbs", "response_id": "{a}", "value": 1, "extra": 1}, 422, "extra"),
        ({"kind": "thumbs", "response_id": "{a}", "value": 1, "rater": "no spaces"}, 403, "admin"),
        ({"kind": "thumbs", "response_id": "{a}", "value": 1, "rater": "x" * 65}, 422, "rater"),
    ],
)
def test_bad_feedback_is_refused_and_nothing_is_written(
    server: LiveServer, client: openai.OpenAI, body: dict, status: int, message: str
) -> None:
    a = int(ask(client).id)
    body = {
        k: (
            [a if x == "{a}" else x for x in v] if isinstance(v, list) else (a if v == "{a}" else v)
        )
        for k, v in body.items()
    }
    before = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    resp = httpx.post(f"{server.url}/v1/feedback", json=body, headers=server.auth)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json() == before


def test_oversized_body_is_refused(server: LiveServer) -> None:
    resp = httpx.post(
        f"{server.url}/v1/feedback",
        content=b"x" * 2_000_000,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]["message"]


def test_oversized_body_without_a_length_is_refused_and_a_small_one_passes(
    server: LiveServer,
) -> None:
    """A chunked body names no Content-Length: it is counted as it arrives."""

    def chunked(body: bytes) -> Iterator[bytes]:
        for i in range(0, len(body), 64_000):
            yield body[i : i + 64_000]

    before = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    big = b'{"kind": "thumbs", "response_id": 1, "value": 1, "rater": "' + b"x" * 2_000_000 + b'"}'
    resp = httpx.post(
        f"{server.url}/v1/feedback",
        content=chunked(big),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json() == before

    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunked(b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'),
        headers={"content-type": "application/json", **server.auth},
    )
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert 1 <= reply["usage"]["completion_tokens"] <= 2


def test_openapi_schema_describes_the_contract(server: LiveServer) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/health", "/v1/chat/completions", "/v1/feedback", "/v1/feedback/stats"):
        assert path in schema["paths"]
    feedback = schema["paths"]["/v1/feedback"]["post"]
    assert "201" in feedback["responses"]
    kinds = {"ThumbsIn", "RatingIn", "EditIn", "ComparisonIn", "RankingIn"}
    assert kinds <= set(schema["components"]["schemas"])
    config = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert schema["info"]["version"] == config["project"]["version"]


def test_admin_routes_need_the_token(server: LiveServer) -> None:
    refused = httpx.post(f"{server.url}/v1/admin/snapshot")
    assert refused.status_code == 401
    error = refused.json()["error"]  # every route answers errors in the one shape
    assert error["type"] == "invalid_request_error" and "Bearer <token>" in error["message"]
    versions = httpx.get(f"{server.url}/v1/admin/versions", headers=server.auth).json()
    assert [(v["id"], v["status"]) for v in versions] == [("policy-v1", "promoted")]
    assert not server.data_dir.admin_token_file.exists()  # gone at the token's first sign-in
