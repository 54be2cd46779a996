"""Append-only, named schema migrations, applied in order when a store opens.

Never edit or reorder an entry that has shipped: add a new one. Each runs in its own transaction
together with the row that records it in `schema_migrations`.
"""

from __future__ import annotations

import duckdb

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE raters (
            id VARCHAR PRIMARY KEY,
            role VARCHAR NOT NULL CHECK (role IN ('user', 'rater', 'operator')),
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE conversations (
            id BIGINT PRIMARY KEY,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        -- The transcript: prompt turns and the answers given. Regenerated answers share an idx.
        CREATE TABLE messages (
            conversation_id BIGINT NOT NULL,
            idx INTEGER NOT NULL,
            role VARCHAR NOT NULL,
            content VARCHAR NOT NULL,
            response_id BIGINT,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE responses (
            id BIGINT PRIMARY KEY,
            conversation_id BIGINT NOT NULL,
            prompt JSON NOT NULL,
            prompt_hash VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            model_version_id VARCHAR NOT NULL,
            params JSON NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_ms DOUBLE NOT NULL,
            finish_reason VARCHAR NOT NULL,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE thumbs (
            id BIGINT PRIMARY KEY,
            response_id BIGINT NOT NULL,
            value TINYINT NOT NULL CHECK (value IN (-1, 1)),
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE ratings (
            id BIGINT PRIMARY KEY,
            response_id BIGINT NOT NULL,
            score TINYINT NOT NULL CHECK (score BETWEEN 1 AND 5),
            reason VARCHAR,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE edits (
            id BIGINT PRIMARY KEY,
            response_id BIGINT NOT NULL,
            text VARCHAR NOT NULL,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE comparisons (
            id BIGINT PRIMARY KEY,
            response_a BIGINT NOT NULL,
            response_b BIGINT NOT NULL,
            winner VARCHAR NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        -- response_ids best first.
        CREATE TABLE rankings (
            id BIGINT PRIMARY KEY,
            response_ids BIGINT[] NOT NULL,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE model_versions (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL CHECK (kind IN ('policy', 'reward')),
            base VARCHAR NOT NULL,
            parent VARCHAR,
            artifact_path VARCHAR NOT NULL,
            adapter BOOLEAN NOT NULL,
            snapshot_id VARCHAR,
            config JSON NOT NULL,
            metrics JSON NOT NULL,
            status VARCHAR NOT NULL
                CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE training_runs (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            progress DOUBLE NOT NULL,
            snapshot_id VARCHAR,
            version_id VARCHAR,
            config JSON NOT NULL,
            error VARCHAR,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ
        );
        CREATE TABLE snapshots (
            id VARCHAR PRIMARY KEY,
            path VARCHAR NOT NULL,
            manifest JSON NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        "0002_promotions_and_run_progress",
        """
        ALTER TABLE model_versions ADD COLUMN status_reason VARCHAR;
        ALTER TABLE training_runs ADD COLUMN stage VARCHAR;
        ALTER TABLE training_runs ADD COLUMN metrics JSON;
        ALTER TABLE training_runs ADD COLUMN trigger VARCHAR;
        -- Every change of the served version, in order: what rollback walks back through.
        CREATE TABLE promotions (
            id BIGINT PRIMARY KEY,
            kind VARCHAR NOT NULL,
            version_id VARCHAR NOT NULL,
            previous_version_id VARCHAR,
            action VARCHAR NOT NULL CHECK (action IN ('promote', 'rollback')),
            reason VARCHAR,
            created_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        "0003_accounts_and_audit",
        """
        -- Who may sign in, in which role; tokens as their SHA-256 only.
        CREATE TABLE accounts (
            name VARCHAR PRIMARY KEY,
            role VARCHAR NOT NULL CHECK (role IN ('user', 'rater', 'operator', 'admin')),
            token_sha256 VARCHAR NOT NULL,
            disabled BOOLEAN NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        );
        -- Every operator and admin action: who did what to what, when.
        CREATE TABLE audit_log (
            id BIGINT PRIMARY KEY,
            actor VARCHAR NOT NULL,
            action VARCHAR NOT NULL,
            target VARCHAR,
            detail JSON,
            created_at TIMESTAMPTZ NOT NULL
        );
        -- A version trained on a snapshot that held rows of someone forgotten since.
        ALTER TABLE model_versions ADD COLUMN trained_on_forgotten BOOLEAN DEFAULT false;
        """,
    ),
    (
        # One vote per rater and item (`validation.vote_item`): a repeat replaces the vote. Rows
        # voted twice before keep the newest. DuckDB builds an index only on a table without
        # uncommitted changes: the indexes come in the next migration.
        "0004_vote_items",
        """
        ALTER TABLE thumbs ADD COLUMN item VARCHAR;
        UPDATE thumbs SET item = CAST(response_id AS VARCHAR);
        DELETE FROM thumbs WHERE id NOT IN (SELECT max(id) FROM thumbs GROUP BY rater_id, item);
        ALTER TABLE ratings ADD COLUMN item VARCHAR;
        UPDATE ratings SET item = CAST(response_id AS VARCHAR);
        DELETE FROM ratings WHERE id NOT IN (SELECT max(id) FROM ratings GROUP BY rater_id, item);
        ALTER TABLE edits ADD COLUMN item VARCHAR;
        UPDATE edits SET item = CAST(response_id AS VARCHAR);
        DELETE FROM edits WHERE id NOT IN (SELECT max(id) FROM edits GROUP BY rater_id, item);
        ALTER TABLE comparisons ADD COLUMN item VARCHAR;
        UPDATE comparisons
            SET item = least(response_a, response_b) || ',' || greatest(response_a, response_b);
        DELETE FROM comparisons
            WHERE id NOT IN (SELECT max(id) FROM comparisons GROUP BY rater_id, item);
        ALTER TABLE rankings ADD COLUMN item VARCHAR;
        UPDATE rankings SET item = array_to_string(list_sort(response_ids), ',');
        DELETE FROM rankings WHERE id NOT IN (SELECT max(id) FROM rankings GROUP BY rater_id, item);
        """,
    ),
    (
        "0005_one_vote_per_rater_and_item",
        """
        CREATE UNIQUE INDEX thumbs_one_vote ON thumbs (rater_id, item);
        CREATE UNIQUE INDEX ratings_one_vote ON ratings (rater_id, item);
        CREATE UNIQUE INDEX edits_one_vote ON edits (rater_id, item);
        CREATE UNIQUE INDEX comparisons_one_vote ON comparisons (rater_id, item);
        CREATE UNIQUE INDEX rankings_one_vote ON rankings (rater_id, item);
        """,
    ),
    (
        "0006_rating_tasks_and_quarantine",
        """
        -- Rating tasks (`feedback.tasks`): answers to one prompt, judged blind by `overlap`
        -- raters, never by the prompt's author. A judgment is the rater's vote on `item` (the
        -- comparison or ranking of these answers), so a task is done when `overlap` raters
        -- other than its author voted on its item.
        CREATE TABLE tasks (
            id BIGINT PRIMARY KEY,
            kind VARCHAR NOT NULL CHECK (kind IN ('comparison', 'ranking')),
            prompt_hash VARCHAR NOT NULL,
            response_ids BIGINT[] NOT NULL,
            item VARCHAR NOT NULL UNIQUE,
            author VARCHAR,
            source VARCHAR NOT NULL,
            overlap INTEGER NOT NULL CHECK (overlap >= 1),
            priority INTEGER NOT NULL,
            -- The answer a gold task's raters should prefer (its known answer), set by an
            -- operator; gold tasks go to every rater once and score them.
            gold_response_id BIGINT,
            created_at TIMESTAMPTZ NOT NULL
        );
        -- Tasks a rater passed on: never handed to them again.
        CREATE TABLE task_skips (
            task_id BIGINT NOT NULL,
            rater_id VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (task_id, rater_id)
        );
        -- Raters whose rows no snapshot keeps until an operator reinstates them.
        CREATE TABLE quarantine (
            rater_id VARCHAR PRIMARY KEY,
            reason VARCHAR,
            actor VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        "0007_canaries",
        """
        -- A candidate held in canary (`feedback.canary`): it answers `share` of conversations
        -- beside `baseline_id` (what served when it began) until people decide.
        CREATE TABLE canaries (
            id BIGINT PRIMARY KEY,
            version_id VARCHAR NOT NULL,
            baseline_id VARCHAR NOT NULL,
            share DOUBLE NOT NULL,
            min_judgments INTEGER NOT NULL,
            min_win_rate DOUBLE NOT NULL,
            status VARCHAR NOT NULL
                CHECK (status IN ('running', 'promoted', 'rejected', 'stopped')),
            result JSON,
            started_at TIMESTAMPTZ NOT NULL,
            ended_at TIMESTAMPTZ
        );
        """,
    ),
    (
        "0008_blind_judgments_and_trusted_accounts",
        """
        -- The rating task a vote was given on, when the queue handed it to its rater: the human
        -- gate counts only those (a vote posted directly, or replaced by one, has none).
        ALTER TABLE comparisons ADD COLUMN task_id BIGINT;
        ALTER TABLE rankings ADD COLUMN task_id BIGINT;
        -- One rater's share of the judgments a canary waits for, at most.
        ALTER TABLE canaries ADD COLUMN max_rater_share DOUBLE DEFAULT 0.25;
        -- Users an operator trusts: their edits may become training targets.
        ALTER TABLE accounts ADD COLUMN trusted BOOLEAN DEFAULT false;
        """,
    ),
    (
        "0009_task_scores",
        """
        -- What a judgment of each open task would tell the reward model `reward_version`
        -- (`feedback.task_scores`): the rating queue's `active` selection asks the most
        -- informative first.
        CREATE TABLE task_scores (
            task_id BIGINT PRIMARY KEY,
            reward_version VARCHAR NOT NULL,
            info DOUBLE NOT NULL,
            margin DOUBLE NOT NULL,
            scored_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
]


def apply_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied now."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    done = {row[0] for row in con.execute("SELECT name FROM schema_migrations").fetchall()}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations (name) VALUES (?)", [name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
