"""Training datasets built from a snapshot: SQL over its parquet files, TRL's own formats.

Every dataset is conversational (lists of `{role, content}` messages), in the columns TRL 1.16's
trainers read:

- `preference` (DPOTrainer, reward model): `prompt`, `chosen`, `rejected`, plus `source` naming
  the kind of feedback the pair came from (trainers drop columns they do not use): an explicit
  `comparison` or `ranking`; or implicit, from `thumbs` (up beats down on one prompt), `rating`,
  `edit` (the edit beats the answer) and `regenerate` (the answer a person went on from beats
  the one they regenerated). A snapshot's trust policy names the sources its preference
  dataset takes (`TrustSettings.pair_sources`). And `weight`: the trust weight of the pair's
  voter as the snapshot's accounts carry it (`feedback.raters.rater_weights`; 1 for users,
  imports and a snapshot without weights), by which the reward model's and DPO's losses weigh
  the pair (`train.weighted`); pairs of weight 0 are left out.
- `kto` (KTOTrainer): `prompt`, `completion`, `label`.
- `sft` (SFTTrainer): `prompt`, `completion` (the loss on the completion only).
- `prompts`: `prompt`, every distinct prompt people asked, whether or not anyone gave feedback on
  its answers: what the jobs that sample the policy's own answers and score them with a reward
  model (`bon`, `rl`) answer, so that a few judgments teach the reward model and the policy then
  learns on all the traffic.

Feedback is untrusted input, so the snapshot's trust policy also says whose edits may become
targets (`TrustSettings.edits`), and no account of the `user` role gives more than
`TrustSettings.max_user_share` of the preference pairs, of the KTO rows or of the prompts (its
first asker's). Every other target is
an answer the server produced (`responses.text`), never text from a client's history.

Each is split train/held-out by prompt hash, so no prompt is ever on both sides: a model is never
evaluated on a prompt it was trained on, whichever answers or feedback kinds the prompt has.
The same snapshot always gives the same rows; their order within a file is unspecified: sorting
~1M wide rows would add about 40% to the build, and the trainers shuffle anyway.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import duckdb
import pyarrow.parquet as pq

from tuneloop.core.settings import TrustSettings
from tuneloop.feedback.snapshot import load_manifest
from tuneloop.feedback.trust import TRUSTED_SOURCES

DATASETS_DIRNAME = "datasets"
DEFAULT_HELDOUT_PERCENT = 10
# The held-out bucket of a prompt is int(prompt_hash[:BUCKET_HEX_CHARS], 16) % 100.
BUCKET_HEX_CHARS = 8
_MESSAGES_TYPE = '[{"role":"VARCHAR","content":"VARCHAR"}]'


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    train: Path
    heldout: Path
    train_rows: int
    heldout_rows: int


# pkey: the 16 hex chars of prompt_hash as one UBIGINT (same identity, cheaper join key).
# Per-response aggregates: net thumbs (0 says nothing) and mean rating.
_SETUP_SQL = """
CREATE TEMP TABLE prompts AS
    SELECT ('0x' || prompt_hash)::UBIGINT AS pkey,
           from_json(any_value(prompt), '{messages_type}') AS prompt,
           ('0x' || prompt_hash[:{hex_chars}])::UBIGINT % 100 < {heldout_percent} AS heldout
    FROM responses GROUP BY prompt_hash;
CREATE TEMP TABLE resp AS
    SELECT id, ('0x' || prompt_hash)::UBIGINT AS pkey, text, conversation_id,
           json_array_length(prompt) AS turns, prompt, rater_id
    FROM responses;
CREATE TEMP TABLE net_thumbs AS
    SELECT r.id, r.pkey, r.text, t.net, t.voter
    FROM (
        SELECT response_id, sum(value) AS net, arg_min(rater_id, id) AS voter
        FROM thumbs GROUP BY response_id
    ) t
    JOIN resp r ON r.id = t.response_id
    WHERE t.net <> 0;
CREATE TEMP TABLE mean_ratings AS
    SELECT r.id, r.pkey, r.text, m.mean, m.voter
    FROM (
        SELECT response_id, avg(score) AS mean, arg_min(rater_id, id) AS voter
        FROM ratings GROUP BY response_id
    ) m
    JOIN resp r ON r.id = m.response_id;
-- Each prompt once, with the account that first asked it.
CREATE TEMP TABLE asked AS
    SELECT pkey, arg_min(rater_id, id) AS voter FROM resp GROUP BY pkey;
-- Edits that may become training targets (the snapshot's trust policy, `_edit_filter`).
CREATE TEMP TABLE good_edits AS
    SELECT e.response_id, e.text, e.rater_id AS voter FROM edits e WHERE {edit_filter};
"""

# One row per (chosen, rejected) pair of answers to one prompt.
_PAIRS_SQL = """
CREATE TEMP TABLE pairs AS
WITH
comparison_pairs AS (
    SELECT 'comparison' AS source, a.pkey,
           CASE c.winner WHEN 'a' THEN a.text ELSE b.text END AS chosen,
           CASE c.winner WHEN 'a' THEN b.text ELSE a.text END AS rejected,
           c.rater_id AS voter
    FROM comparisons c
    JOIN resp a ON a.id = c.response_a
    JOIN resp b ON b.id = c.response_b
    WHERE c.winner IN ('a', 'b')
),
ranked AS (
    SELECT id, rater_id, unnest(response_ids) AS response_id,
           generate_subscripts(response_ids, 1) AS pos
    FROM rankings
),
ranking_pairs AS (
    SELECT 'ranking' AS source, a.pkey, a.text AS chosen, b.text AS rejected, hi.rater_id AS voter
    FROM ranked hi
    JOIN ranked lo ON lo.id = hi.id AND hi.pos < lo.pos
    JOIN resp a ON a.id = hi.response_id
    JOIN resp b ON b.id = lo.response_id
),
thumbs_pairs AS (
    SELECT 'thumbs' AS source, up.pkey, up.text AS chosen, down.text AS rejected, up.voter
    FROM net_thumbs up
    JOIN net_thumbs down ON down.pkey = up.pkey AND down.net < 0
    WHERE up.net > 0
),
edit_pairs AS (
    SELECT 'edit' AS source, r.pkey, e.text AS chosen, r.text AS rejected, e.voter
    FROM good_edits e JOIN resp r ON r.id = e.response_id
),
rating_pairs AS (
    SELECT 'rating' AS source, hi.pkey, hi.text AS chosen, lo.text AS rejected, hi.voter
    FROM mean_ratings hi
    JOIN mean_ratings lo ON lo.pkey = hi.pkey AND lo.mean < hi.mean
),
-- Answers to one prompt given again in one conversation (the chat's regenerate): the one the
-- person went on from (a later turn's history holds it) beats the ones they left.
kept AS (
    SELECT DISTINCT r.id, r.conversation_id, r.pkey, r.text, r.rater_id
    FROM resp r
    JOIN resp later ON later.conversation_id = r.conversation_id AND later.turns > r.turns
    WHERE json_extract_string(later.prompt, '$[' || r.turns || '].content') = r.text
),
regenerate_pairs AS (
    SELECT 'regenerate' AS source, k.pkey, k.text AS chosen, o.text AS rejected,
           k.rater_id AS voter
    FROM kept k
    JOIN resp o ON o.conversation_id = k.conversation_id AND o.pkey = k.pkey AND o.id <> k.id
    WHERE o.id NOT IN (SELECT id FROM kept)
)
SELECT u.*, coalesce(w.weight, 1.0)::DOUBLE AS weight FROM (
    SELECT * FROM comparison_pairs
    UNION ALL SELECT * FROM ranking_pairs
    UNION ALL SELECT * FROM thumbs_pairs
    UNION ALL SELECT * FROM edit_pairs
    UNION ALL SELECT * FROM rating_pairs
    UNION ALL SELECT * FROM regenerate_pairs
) u LEFT JOIN rater_weights w ON w.name = u.voter
WHERE chosen <> rejected AND coalesce(w.weight, 1.0) > 0;
"""

# name -> SELECT producing the dataset's columns plus `heldout`.
_DATASET_SQL: dict[str, str] = {
    "preference": """
        SELECT p.prompt,
               [{'role': 'assistant', 'content': x.chosen}] AS chosen,
               [{'role': 'assistant', 'content': x.rejected}] AS rejected,
               x.source, x.weight, p.heldout
        FROM pairs x JOIN prompts p USING (pkey)
    """,
    "kto": """
        SELECT p.prompt,
               [{'role': 'assistant', 'content': t.text}] AS completion,
               t.net > 0 AS label, p.heldout
        FROM net_thumbs t JOIN prompts p USING (pkey)
    """,
    # Prompt and completion, not one `messages` list: the loss falls on the completion alone,
    # never on assistant turns a client wrote into the history it sent.
    "sft": """
        SELECT p.prompt, [{'role': 'assistant', 'content': a.text}] AS completion, p.heldout
        FROM (
            SELECT r.pkey, e.text FROM good_edits e JOIN resp r ON r.id = e.response_id
            UNION ALL
            SELECT pkey, text FROM mean_ratings WHERE mean >= 4
        ) a JOIN prompts p USING (pkey)
    """,
    "prompts": """
        SELECT p.prompt, p.heldout FROM asked a JOIN prompts p USING (pkey)
    """,
}
DATASET_NAMES: tuple[str, ...] = tuple(_DATASET_SQL)


def build_datasets(
    snapshot_dir: Path,
    out_dir: Path | None = None,
    *,
    heldout_percent: int = DEFAULT_HELDOUT_PERCENT,
) -> dict[str, DatasetFiles]:
    """Build every dataset from the snapshot in `snapshot_dir`, as
    `<out_dir>/<name>.train.parquet` and `<name>.heldout.parquet`
    (out_dir defaults to `snapshot_dir/datasets/`)."""
    if not 0 <= heldout_percent <= 100:
        raise ValueError(f"heldout_percent must be 0 to 100, got {heldout_percent}")
    snapshot_dir = Path(snapshot_dir)
    out_dir = Path(out_dir) if out_dir is not None else snapshot_dir / DATASETS_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(snapshot_dir)
    con = duckdb.connect()
    try:
        for table, info in manifest["tables"].items():
            source = _sql_str(snapshot_dir / info["file"])
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{source}')")
        if "accounts" not in manifest["tables"]:  # a snapshot from before accounts were kept
            con.execute(
                "CREATE VIEW accounts AS SELECT * FROM (VALUES ('', '', false)) "
                "a(name, role, trusted) WHERE false"
            )
        _weights_view(con)
        trust = _trust(manifest)
        con.execute(
            _SETUP_SQL.format(
                messages_type=_MESSAGES_TYPE,
                hex_chars=BUCKET_HEX_CHARS,
                heldout_percent=int(heldout_percent),
                edit_filter=_edit_filter(trust),
            )
        )
        con.execute(_PAIRS_SQL)
        con.execute(
            "DELETE FROM pairs WHERE NOT list_contains(?::VARCHAR[], source)",
            [list(trust.sources())],
        )
        _cap_user_share(con, "pairs", "pkey, chosen, rejected", trust.max_user_share)
        _cap_user_share(con, "net_thumbs", "id", trust.max_user_share)
        _cap_user_share(con, "asked", "pkey", trust.max_user_share)
        built = {}
        for name, select in _DATASET_SQL.items():
            # One query per split: cheaper than materializing the dataset (the held-out
            # query is filtered early) and than COPY's PARTITION_BY.
            train, heldout = out_dir / f"{name}.train.parquet", out_dir / f"{name}.heldout.parquet"
            built[name] = DatasetFiles(
                name=name,
                train=train,
                heldout=heldout,
                train_rows=_copy_atomic(con, _split_sql(select, heldout=False), train),
                heldout_rows=_copy_atomic(con, _split_sql(select, heldout=True), heldout),
            )
    finally:
        con.close()
    return built


def load_split(path: Path, *, cache_dir: Path | None = None) -> datasets.Dataset:
    """One split file as a `datasets.Dataset`, ready for a TRL trainer.

    `Dataset.from_parquet` refuses a file without rows ("corresponds to no data"), which a small
    held-out split often is: that one is read into an empty in-memory dataset instead.
    """
    if pq.ParquetFile(path).metadata.num_rows == 0:
        return datasets.Dataset(pq.read_table(path))
    return datasets.Dataset.from_parquet(
        str(path), cache_dir=str(cache_dir) if cache_dir is not None else None
    )


def _weights_view(con: duckdb.DuckDBPyConnection) -> None:
    """`rater_weights(name, weight)`: the snapshot accounts' trust weights; none in a snapshot
    from before they were kept (every pair then weighs 1)."""
    columns = {name for (name, *_) in con.execute("DESCRIBE accounts").fetchall()}
    source = "name, weight FROM accounts" if "weight" in columns else "'', 1.0::DOUBLE WHERE false"
    con.execute(f"CREATE TEMP VIEW rater_weights(name, weight) AS SELECT {source}")


def _trust(manifest: dict) -> TrustSettings:
    """The snapshot's trust policy; a snapshot from before a setting existed behaves as then
    (every edit a target, no share capped)."""
    given = manifest.get("trust") or {}
    return TrustSettings(
        pair_sources=given.get("pair_sources", "all"),
        max_user_share=given.get("max_user_share", 1.0),
        edits=given.get("edits", "all"),
    )


def _edit_filter(trust: TrustSettings) -> str:
    """SQL on `edits`: those whose text may become a training target. An edit is text a person
    wrote, not an answer the server gave: by default only raters and above, users an operator
    trusts, and the operator's imports."""
    if trust.edits == "all":
        return "true"
    sources = ", ".join(f"'{name}'" for name in TRUSTED_SOURCES)
    return (
        f"rater_id IN ({sources}) OR rater_id IN (SELECT name FROM accounts "
        "WHERE trusted OR role IN ('rater', 'operator', 'admin'))"
    )


def _cap_user_share(con: duckdb.DuckDBPyConnection, table: str, key: str, share: float) -> None:
    """Keep at most `share` of `table`'s rows from any one account of the `user` role (its
    `voter`): the cap is on the share of what remains, found by lowering it until it holds.
    Which rows stay is drawn by a hash of their `key` columns, so the order they came in (or a
    flood's timing) does not choose."""
    if share >= 1:
        return
    counts = dict(
        con.execute(
            f"SELECT voter, count(*) FROM {table} "
            "WHERE voter IN (SELECT name FROM accounts WHERE role = 'user') GROUP BY voter"
        ).fetchall()
    )
    if not counts:
        return
    others = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] - sum(counts.values())
    cap = max(counts.values())
    while True:
        total = others + sum(min(n, cap) for n in counts.values())
        lower = max(1, math.floor(share * total))
        if lower >= cap:
            break
        cap = lower
    over = [name for name, n in counts.items() if n > cap]
    if over:
        con.execute(
            f"""
            DELETE FROM {table} WHERE rowid IN (
                SELECT rowid FROM (
                    SELECT rowid, row_number() OVER (
                        PARTITION BY voter ORDER BY hash({key})
                    ) AS nth
                    FROM {table} WHERE list_contains($over, voter)
                ) WHERE nth > $cap
            )
            """,
            {"over": over, "cap": cap},
        )


def _split_sql(select: str, *, heldout: bool) -> str:
    return f"SELECT * EXCLUDE (heldout) FROM ({select}) WHERE heldout = {heldout}"


def _copy_atomic(con: duckdb.DuckDBPyConnection, select: str, path: Path) -> int:
    """COPY a query to parquet through a `.tmp` file; returns the rows written."""
    tmp = path.with_name(path.name + ".tmp")
    rows = con.execute(f"COPY ({select}) TO '{_sql_str(tmp)}' (FORMAT parquet)").fetchall()
    os.replace(tmp, path)
    return int(rows[0][0])


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")
