"""Training datasets for job tests, written as `tuneloop.feedback.datasets.build_datasets` writes
them: preference pairs, KTO rows and SFT rows, train and held-out (and, where a test writes
them, the prompts people asked)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMAS = {
    "preference": pa.schema(
        [
            ("prompt", MESSAGES),
            ("chosen", MESSAGES),
            ("rejected", MESSAGES),
            ("source", pa.string()),
        ]
    ),
    "kto": pa.schema([("prompt", MESSAGES), ("completion", MESSAGES), ("label", pa.bool_())]),
    "sft": pa.schema([("prompt", MESSAGES), ("completion", MESSAGES)]),
    "prompts": pa.schema([("prompt", MESSAGES)]),
}
TOPICS = ("lists", "tuples", "dicts", "sets", "strings", "files", "loops", "classes", "modules")


def msg(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def pairs(n: int, offset: int, rng: random.Random) -> list[dict[str, Any]]:
    """Easy to learn: every chosen answer says "Certainly", no rejected one does."""
    rows = []
    for i in range(offset, offset + n):
        topic = rng.choice(TOPICS)
        rows.append(
            {
                "prompt": msg("user", f"Question {i}: what about {topic}?"),
                "chosen": msg("assistant", f"Certainly, {topic} are useful here."),
                "rejected": msg("assistant", f"No idea about {topic} at all."),
                "source": "comparison",
            }
        )
    return rows


def write_split(out: Path, name: str, split: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[name])
    pq.write_table(table, out / f"{name}.{split}.parquet")


def write_datasets(out: Path, *, train_pairs: int = 64, heldout_pairs: int = 16) -> Path:
    """Files as `tuneloop.feedback.datasets.build_datasets` writes them."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    splits = {"train": pairs(train_pairs, 0, rng), "heldout": pairs(heldout_pairs, 1000, rng)}
    for split, rows in splits.items():
        write_split(out, "preference", split, rows)
        kto = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
        kto += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
        write_split(out, "kto", split, kto)
        sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        write_split(out, "sft", split, sft)
    return out
