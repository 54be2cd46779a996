"""Importing preference files (TRL formats, HH-RLHF dialogues) into the feedback store."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneloop.core.records import Comparison, Message, Response, SamplingParams
from tuneloop.feedback.datasets import build_datasets
from tuneloop.feedback.importer import (
    ImportFormatError,
    PreferencePair,
    import_preferences,
    read_preference_pairs,
)
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore

HH_PAIRS = Path(__file__).resolve().parents[3] / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def stored_pairs(store: FeedbackStore) -> list[dict[str, Any]]:
    return store.read(
        """
        SELECT a.prompt, a.text AS chosen, b.text AS rejected, c.winner, c.rater_id
        FROM comparisons c
        JOIN responses a ON a.id = c.response_a
        JOIN responses b ON b.id = c.response_b
        ORDER BY c.id
        """
    )


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def test_conversational_pairs_become_two_responses_and_a_comparison(
    store: FeedbackStore, tmp_path: Path
) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, user("What is a list?")]
    rows = [
        {"prompt": prompt, "chosen": [assistant("A sequence.")], "rejected": [assistant("No.")]},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go.")]},
    ]
    result = import_preferences(store, write_jsonl(tmp_path / "p.jsonl", rows))

    assert (result.pairs, result.skipped, result.responses) == (2, 0, 4)
    pairs = stored_pairs(store)
    assert [(p["chosen"], p["rejected"], p["winner"]) for p in pairs] == [
        ("A sequence.", "No.", "a"),
        ("Hello!", "Go.", "a"),
    ]
    assert json.loads(pairs[0]["prompt"]) == prompt
    assert store.read("SELECT id, role FROM raters") == [{"id": "import", "role": "rater"}]
    responses = store.read("SELECT model_version_id, params, finish_reason FROM responses")
    assert {r["model_version_id"] for r in responses} == {"import"}
    assert json.loads(responses[0]["params"]) == {"source": "import", "file": "p.jsonl"}
    # One conversation per pair: the prompt turns, then both answers at the same index.
    transcript = store.read(
        "SELECT idx, role, content, response_id IS NOT NULL AS answer FROM messages "
        "WHERE conversation_id = (SELECT min(id) FROM conversations) ORDER BY idx, content"
    )
    assert [(m["idx"], m["role"], m["answer"]) for m in transcript] == [
        (0, "system", False),
        (1, "user", False),
        (2, "assistant", True),
        (2, "assistant", True),
    ]
    assert store.feedback_counts()["conversations"] == 2


def test_implicit_prompt_and_standard_string_formats(tmp_path: Path) -> None:
    history = [user("Name a fruit."), assistant("Apple."), user("Another?")]
    rows = [
        {"chosen": [*history, assistant("Pear.")], "rejected": [*history, assistant("Apple.")]},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    ]
    pairs = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl.gz", rows))
    assert pairs == [
        PreferencePair(
            (
                Message("user", "Name a fruit."),
                Message("assistant", "Apple."),
                Message("user", "Another?"),
            ),
            "Pear.",
            "Apple.",
        ),
        PreferencePair((Message("user", "Say hi."),), "Hi!", "No."),
    ]


def test_hh_rlhf_dialogues_split_into_turns(tmp_path: Path) -> None:
    shared = "\n\nHuman: Tell me a joke.\n\nAssistant: Sure. Ready?\n\nHuman: Yes"
    rows = [
        # Answers may hold blank lines, and even a stray "Assistant:" marker.
        {
            "chosen": shared + "\n\nAssistant: A pun.\n\nIt is short.",
            "rejected": shared + "\n\nAssistant: Well...\n\nAssistant: no.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go.",
        },
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    pairs = read_preference_pairs(path)
    assert pairs[0] == PreferencePair(
        (
            Message("user", "Tell me a joke."),
            Message("assistant", "Sure. Ready?"),
            Message("user", "Yes"),
        ),
        "A pun.\n\nIt is short.",
        "Well...\n\nAssistant: no.",
    )
    assert pairs[1] == PreferencePair((Message("user", "Hi"),), "Hello.", "Go.")
    assert len(pairs) == 2  # the empty answer is skipped

    with FeedbackStore(tmp_path / "f.duckdb") as store:
        result = import_preferences(store, path, rater_id="hh")
        assert (result.pairs, result.skipped, result.skip_reasons) == (2, 1, {"empty answer": 1})
        assert {p["rater_id"] for p in stored_pairs(store)} == {"hh"}


def test_json_list_and_parquet_files(tmp_path: Path) -> None:
    answers = {"chosen": [assistant("y")], "rejected": [assistant("n")]}
    rows = [{"prompt": [user(f"q{i}")], **answers} for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    expected = [PreferencePair((Message("user", f"q{i}"),), "y", "n") for i in range(3)]
    assert read_preference_pairs(tmp_path / "p.json") == expected
    assert read_preference_pairs(tmp_path / "p.parquet") == expected
    assert read_preference_pairs(tmp_path / "p.parquet", limit=2) == expected[:2]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"chosen": "x", ', "line 3: invalid JSON"),
        ('{"prompt": "q", "chosen": "y"}', "line 3: missing key(s): rejected"),
        ('{"chosen": "Yes", "rejected": "No"}', "line 3: string pairs without a prompt must be HH"),
        (
            json.dumps(
                {"prompt": [user("q")], "chosen": [user("y")], "rejected": [assistant("n")]}
            ),
            "line 3: chosen must come down to one assistant message",
        ),
        (
            json.dumps({"prompt": [{"role": "bot", "content": "q"}], "chosen": [], "rejected": []}),
            "line 3: prompt: role must be one of",
        ),
        ('{"prompt": "q", "chosen": ["y"], "rejected": "n"}', "line 3: chosen and rejected must"),
    ],
)
def test_malformed_file_is_rejected_whole_with_its_line(
    store: FeedbackStore, tmp_path: Path, bad_line: str, message: str
) -> None:
    good = json.dumps({"prompt": "q", "chosen": "y", "rejected": "n"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(ImportFormatError) as err:
        import_preferences(store, path)
    assert f"bad.jsonl {message}" in str(err.value)
    assert set(store.feedback_counts().values()) == {0}
    assert store.read("SELECT * FROM raters") == []


def test_import_sits_beside_live_writes(store: FeedbackStore, tmp_path: Path) -> None:
    """Ids come from the store's allocators, so normal writes after an import never collide."""
    rows = [{"prompt": f"q{i}", "chosen": "y", "rejected": "n"} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert import_preferences(store, path, limit=3, batch_pairs=2).pairs == 3
    assert import_preferences(store, path, limit=1).pairs == 1  # same rater again: no conflict
    ids = []
    for text in ("one", "two"):
        r = Response(
            id=store.new_response_id(),
            conversation_id=store.new_conversation_id(),
            prompt=(Message("user", "live"),),
            text=text,
            model_version_id="policy-v1",
            params=SamplingParams(),
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1.0,
        )
        ids.append(store.submit_response(r).result())
    assert store.record_feedback(Comparison(ids[0], ids[1], "b", "alice")) == 5
    counts = store.feedback_counts()
    assert (counts["comparison"], counts["responses"], counts["conversations"]) == (5, 10, 6)


@pytest.mark.skipif(not HH_PAIRS.exists(), reason=f"real HH-RLHF data not found at {HH_PAIRS}")
def test_real_hh_rlhf_pairs_import_fast_and_build_datasets(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path / "f.duckdb") as store:
        started = time.perf_counter()
        result = import_preferences(store, HH_PAIRS)
        seconds = time.perf_counter() - started
        assert result.pairs + result.skipped == 1800
        assert result.pairs >= 1790
        assert seconds < 10, f"importing 1,800 pairs took {seconds:.1f} s"
        counts = store.feedback_counts()
        assert counts["comparison"] == result.pairs
        assert counts["responses"] == 2 * result.pairs
        assert counts["conversations"] == result.pairs
        mismatched = store.read(
            "SELECT count(*) AS n FROM comparisons c JOIN responses a ON a.id = c.response_a "
            "JOIN responses b ON b.id = c.response_b WHERE a.prompt_hash <> b.prompt_hash"
        )
        assert mismatched == [{"n": 0}]
        first = read_preference_pairs(HH_PAIRS, limit=1)[0]
        assert stored_pairs(store)[0]["chosen"] == first.chosen
        snapshot = create_snapshot(store, tmp_path / "snapshots")
    built = build_datasets(snapshot.path)["preference"]
    assert built.train_rows + built.heldout_rows == result.pairs
