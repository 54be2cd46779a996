"""Import preference pairs from files into the feedback store, as comparisons from a rater.

Accepted rows (JSON Lines, optionally gzipped, a JSON list, or Parquet), in TRL's preference formats
or Anthropic HH-RLHF's:

- conversational: `{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}`
- conversational, implicit prompt: `{"chosen": [msgs], "rejected": [msgs]}`; the prompt is the
  longest common prefix of the two conversations
- standard: `{"prompt": str, "chosen": str, "rejected": str}` (the prompt is one user turn)
- HH-RLHF: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`; the prompt
  is the common start of both dialogues, cut back to their last shared "Assistant:" marker (as
  TRL's hh-rlhf dataset script does), so each answer is what follows it.

Each side must come down to one assistant answer. Every pair becomes one conversation holding the
prompt and both answers (at the same turn index, like regenerated answers), two responses from
model version "import", and one comparison with winner "a" (the chosen answer) from the importing
rater. The whole file is parsed and checked before anything is written; rows then go in through
the store's writer, one transaction per batch.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from tuneloop.core.records import ROLES, Comparison, Message, messages_to_json, prompt_hash
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.validation import check_rater_id, vote_item

IMPORT_MODEL_VERSION = "import"
DEFAULT_BATCH_PAIRS = 500
_HUMAN = "\n\nHuman:"
_ASSISTANT = "\n\nAssistant:"


class ImportFormatError(ValueError):
    """A row that is not a preference pair in a known format; names the file and line."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def prompt_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.prompt]


@dataclass(frozen=True)
class ImportResult:
    pairs: int  # comparisons written
    responses: int  # two per pair
    skipped: int  # rows without a usable pair: identical or empty answers
    skip_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def read_preference_pairs(path: str | Path, *, limit: int | None = None) -> list[PreferencePair]:
    """The usable pairs of a file (rows with identical or empty answers are left out).

    Raises ImportFormatError on the first malformed row, naming its line (row for JSON lists and
    Parquet). With `limit`, stops after that many pairs."""
    return _parse_file(Path(path), limit)[0]


def _parse_file(path: Path, limit: int | None) -> tuple[list[PreferencePair], Counter[str]]:
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    for where, row in _rows(path):
        if limit is not None and len(pairs) >= limit:
            break
        try:
            pair = parse_pair(row)
        except (TypeError, ValueError) as exc:
            raise ImportFormatError(f"{path.name} {where}: {exc}") from None
        if not pair.chosen.strip() or not pair.rejected.strip():
            skipped["empty answer"] += 1
        elif pair.chosen == pair.rejected:
            skipped["identical answers"] += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def parse_pair(row: Any) -> PreferencePair:
    """One row in any of the accepted formats; raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is None:
            # Leave each side its last message at least: identical lists become a skipped pair.
            n = min(_common_prefix_len(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif not isinstance(prompt, list):
            raise ValueError("conversational chosen/rejected need a list of messages as prompt")
        return PreferencePair(
            _messages(prompt, "prompt"), _answer(chosen, "chosen"), _answer(rejected, "rejected")
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            return _hh_pair(chosen, rejected)
        if not isinstance(prompt, str):
            raise ValueError("string chosen/rejected need a string prompt")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return PreferencePair((Message("user", prompt),), chosen, rejected)
    raise ValueError("chosen and rejected must both be strings or both be lists of messages")


def import_preferences(
    store: FeedbackStore,
    path: str | Path,
    *,
    rater_id: str = "import",
    limit: int | None = None,
    batch_pairs: int = DEFAULT_BATCH_PAIRS,
) -> ImportResult:
    """Import a preference file as comparisons by `rater_id` (role "rater"); see the module doc.

    Nothing is written unless the whole file parses. Batches commit one by one, so other writers
    interleave with a long import; a database error would leave the batches before it written."""
    check_rater_id(rater_id)
    started = time.perf_counter()
    pairs, skipped = _parse_file(Path(path), limit)
    params = json.dumps({"source": "import", "file": Path(path).name})
    for start in range(0, len(pairs), batch_pairs):
        rows = _rows_for(store, pairs[start : start + batch_pairs], rater_id, params)
        store.write(lambda con, rows=rows: _write_rows(con, rows, rater_id))
    return ImportResult(
        pairs=len(pairs),
        responses=2 * len(pairs),
        skipped=sum(skipped.values()),
        skip_reasons=dict(skipped),
        seconds=time.perf_counter() - started,
    )


# ---- reading -------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of the file; `where` is "line N" or "row N" (1-based)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"row {i}", row
        return
    opener = gzip.open if name.endswith(".gz") else open
    stem = name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ImportFormatError(f"{path.name} line {exc.lineno}: {exc.msg}") from None
            if not isinstance(data, list):
                raise ImportFormatError(f"{path.name}: expected a JSON list of pairs")
            for i, row in enumerate(data, 1):
                yield f"row {i}", row
            return
        if not stem.endswith(".jsonl"):
            raise ImportFormatError(
                f"{path.name}: unknown file type (expected .jsonl, .jsonl.gz, .json or .parquet)"
            )
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {i}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportFormatError(f"{path.name} line {i}: invalid JSON ({exc.msg})") from None


def _common_prefix_len(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _messages(value: list[Any], what: str) -> tuple[Message, ...]:
    if not value:
        raise ValueError(f"{what} has no messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"{what}: each message needs a string content")
        if m.get("role") not in ROLES:
            raise ValueError(
                f"{what}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
            )
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _answer(value: list[Any], what: str) -> str:
    messages = _messages(value, what)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise ValueError(f"{what} must come down to one assistant message, got {len(messages)}")
    return messages[0].content


def _hh_pair(chosen: str, rejected: str) -> PreferencePair:
    """Split two HH-RLHF dialogues into their shared prompt and the two last answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)
    if cut < 0 or not chosen.startswith(_HUMAN):
        raise ValueError(
            'string pairs without a prompt must be HH-RLHF dialogues ("\\n\\nHuman: ...'
            '\\n\\nAssistant: ...") sharing everything before the last answer'
        )
    prompt = _hh_turns(chosen[:cut])
    if prompt[-1].role != "user":
        raise ValueError("the shared dialogue must end with a Human turn")
    start = cut + len(_ASSISTANT)
    return PreferencePair(
        prompt, _strip_one_space(chosen[start:]), _strip_one_space(rejected[start:])
    )


def _hh_turns(text: str) -> tuple[Message, ...]:
    turns: list[Message] = []
    pos = 0
    while pos < len(text):
        role = "user" if text.startswith(_HUMAN, pos) else "assistant"
        pos += len(_HUMAN if role == "user" else _ASSISTANT)
        nxt = [i for i in (text.find(_HUMAN, pos), text.find(_ASSISTANT, pos)) if i >= 0]
        end = min(nxt, default=len(text))
        turns.append(Message(role, _strip_one_space(text[pos:end])))
        pos = end
    return tuple(turns)


def _strip_one_space(s: str) -> str:
    return s.removeprefix(" ")


# ---- writing -------------------------------------------------------------------------------------


def _rows_for(
    store: FeedbackStore, pairs: list[PreferencePair], rater_id: str, params: str
) -> dict[str, dict[str, list[Any]]]:
    """Column lists per table for a batch of pairs, with ids reserved from the store."""
    now = datetime.now(UTC)
    tables: dict[str, list[dict[str, Any]]] = {
        t: [] for t in ("conversations", "messages", "responses", "comparisons")
    }
    for pair in pairs:
        cid = store.reserve_conversation_id()
        tables["conversations"].append({"id": cid, "rater_id": rater_id, "created_at": now})
        turns = [(m.role, m.content, None) for m in pair.prompt]
        rids = (store.new_response_id(), store.new_response_id())
        turns += [
            ("assistant", text, rid)
            for text, rid in zip((pair.chosen, pair.rejected), rids, strict=True)
        ]
        for idx, (role, content, rid) in enumerate(turns):
            tables["messages"].append(
                {
                    "conversation_id": cid,
                    "idx": min(idx, len(pair.prompt)),  # both answers share the answer's index
                    "role": role,
                    "content": content,
                    "response_id": rid,
                    "created_at": now,
                }
            )
        common = {
            "conversation_id": cid,
            "prompt": messages_to_json(pair.prompt),
            "prompt_hash": prompt_hash(pair.prompt),
            "model_version_id": IMPORT_MODEL_VERSION,
            "params": params,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "latency_ms": 0.0,
            "finish_reason": "import",
            "rater_id": rater_id,
            "created_at": now,
        }
        for text, rid in zip((pair.chosen, pair.rejected), rids, strict=True):
            tables["responses"].append({"id": rid, "text": text, **common})
        tables["comparisons"].append(
            {
                # The store hands out feedback ids itself and has no public allocator for them.
                "id": store.new_feedback_id("comparison"),
                "response_a": rids[0],
                "response_b": rids[1],
                "winner": "a",
                "rater_id": rater_id,
                "item": vote_item(Comparison(rids[0], rids[1], "a")),
                "created_at": now,
            }
        )
    return {t: {c: [r[c] for r in rows] for c in rows[0]} for t, rows in tables.items() if rows}


def _write_rows(
    con: duckdb.DuckDBPyConnection, rows: dict[str, dict[str, list[Any]]], rater_id: str
) -> None:
    con.execute(
        "INSERT INTO raters (id, role, created_at) VALUES (?, 'rater', now()) "
        "ON CONFLICT DO NOTHING",
        [rater_id],
    )
    for table, columns in rows.items():
        names = list(columns)
        select = ", ".join(f"unnest(${i + 1})" for i in range(len(names)))
        con.execute(
            f"INSERT INTO {table} ({', '.join(names)}) SELECT {select}",
            [columns[c] for c in names],
        )
