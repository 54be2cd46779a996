"""Dataset builders over a real snapshot: pair sources, KTO and SFT rows, the held-out split."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tuneloop.core.records import (
    Comparison,
    Edit,
    Message,
    Ranking,
    Rating,
    Response,
    SamplingParams,
    Thumbs,
    prompt_hash,
)
from tuneloop.core.settings import SettingsError, TrustSettings
from tuneloop.feedback.datasets import (
    BUCKET_HEX_CHARS,
    DATASET_NAMES,
    DatasetFiles,
    build_datasets,
    load_split,
)
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore

# The keys TRL 1.16 accepts per dataset type (trl.data_utils.apply_chat_template); `source` is
# extra provenance the trainers drop with their other unused columns.
TRL_COLUMNS = {
    "preference": ["prompt", "chosen", "rejected", "source", "weight"],
    "kto": ["prompt", "completion", "label"],
    "sft": ["prompt", "completion"],
    "prompts": ["prompt"],
}


# The rows here carry made-up rater names, not accounts: admit them, and their edits.
ANY_RATER = TrustSettings(anonymous=True, edits="all")


class Feed:
    """Writes conversations through the store API, one prompt per conversation."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.conversations: dict[tuple[Message, ...], int] = {}
        self.texts: dict[int, str] = {}

    def answer(self, prompt: tuple[Message, ...], text: str) -> int:
        conv = self.conversations.setdefault(prompt, self.store.new_conversation_id())
        rid = self.store.new_response_id()
        self.store.submit_response(
            Response(
                id=rid,
                conversation_id=conv,
                prompt=prompt,
                text=text,
                model_version_id="base-v0",
                params=SamplingParams(temperature=0.9),
                prompt_tokens=len(prompt) * 8,
                completion_tokens=len(text) // 4,
                latency_ms=80.0,
            )
        ).result()
        self.texts[rid] = text
        return rid

    def answers(self, prompt: tuple[Message, ...], *texts: str) -> list[int]:
        return [self.answer(prompt, t) for t in texts]

    def feedback(self, *items: Any) -> None:
        for fb in items:
            self.store.record_feedback(fb)


def wait_all(futures: Iterable[Future]) -> None:
    for fut in list(futures):
        fut.result()


def user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


def msgs(prompt: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in prompt]


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def rows(files: DatasetFiles, split: str = "train") -> list[dict[str, Any]]:
    return pq.read_table(getattr(files, split)).to_pylist()


# Each scenario answers its own prompt, so the rows of one prompt come from one scenario.
COMPARE = (Message("system", "Answer in one sentence."), Message("user", "What is DNS?"))
RANK = user("Rank these: how do I undo a git commit?")
THUMBS = user("Is it safe to eat raw cookie dough?")
THUMBS_ALONE = user("Translate 'good morning' into French.")
EDIT = user("Write a haiku about rain.")
UNRATED = user("How tall is Everest?")
RATE = (
    Message("user", 'Quote: "to be or not to be" — who wrote it?\nAnswer briefly.'),
    Message("assistant", "Shakespeare."),
    Message("user", "Which play?"),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Feed, dict[str, DatasetFiles]]:
    tmp = tmp_path_factory.mktemp("scenarios")
    with FeedbackStore(tmp / "feedback.duckdb") as store:
        f = Feed(store)
        a, b, c, same_as_a = f.answers(
            COMPARE,
            "A name-to-address lookup.",
            "Magic.",
            "A protocol.",
            "A name-to-address lookup.",
        )
        f.feedback(
            Comparison(a, b, "a", rater_id="r1"),
            Comparison(b, c, "b", rater_id="r1"),
            Comparison(a, c, "tie", rater_id="r2"),
            Comparison(a, b, "both_bad", rater_id="r2"),
            Comparison(same_as_a, a, "a", rater_id="r2"),  # same text: no signal
        )
        good, best, bad = f.answers(
            RANK, "git revert HEAD", "git reset --soft HEAD~1", "rm -rf .git"
        )
        f.feedback(Ranking((best, good, bad), rater_id="r3"))

        up, zero, down, down_net = f.answers(
            THUMBS, "No: raw flour and eggs.", "Maybe.", "Yes!", "Sure"
        )
        f.feedback(
            Thumbs(up, 1, rater_id="u1"),
            Thumbs(up, 1, rater_id="u2"),
            Thumbs(zero, 1, rater_id="u1"),
            Thumbs(zero, -1, rater_id="u2"),
            Thumbs(down, -1, rater_id="u1"),
            Thumbs(down_net, -1, rater_id="u1"),
            Thumbs(down_net, -1, rater_id="u2"),
            Thumbs(down_net, 1, rater_id="u3"),
        )
        (lonely_down,) = f.answers(THUMBS_ALONE, "Bonsoir.")
        f.feedback(Thumbs(lonely_down, -1))

        rough, unchanged = f.answers(EDIT, "Rain falls down a lot", "Soft rain on the roof")
        f.feedback(
            Edit(
                rough,
                "Grey rain on tin roofs /\nthe gutters hum their one note /\nthe cat stays inside",
            ),
            Edit(unchanged, "Soft rain on the roof"),
        )

        hi, low, tied = f.answers(RATE, "Hamlet, Act 3.", "Macbeth.", "Hamlet (Act 3, Scene 1).")
        f.feedback(
            Rating(hi, 5, rater_id="r1"),
            Rating(hi, 3, rater_id="r2"),  # mean 4
            Rating(low, 2, reason="wrong play", rater_id="r1"),
            Rating(tied, 4, rater_id="r1"),  # mean 4: ties with hi, no pair between them
        )
        f.answers(UNRATED, "8,849 m.")  # no feedback
        snap = create_snapshot(store, tmp / "snapshots", ANY_RATER)
    return f, build_datasets(snap.path, heldout_percent=0)


def pairs_for(files: DatasetFiles, prompt: tuple[Message, ...]) -> set[tuple[str, str, str]]:
    out = set()
    for r in rows(files):
        if r["prompt"] == msgs(prompt):
            assert len(r["chosen"]) == len(r["rejected"]) == 1
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
            out.add((r["source"], r["chosen"][0]["content"], r["rejected"][0]["content"]))
    return out


def test_default_location_and_counts(built: tuple[Feed, dict[str, DatasetFiles]]) -> None:
    _, ds = built
    assert list(ds) == list(DATASET_NAMES) == ["preference", "kto", "sft", "prompts"]
    for name, files in ds.items():
        assert files.name == name
        assert files.train.parent.name == "datasets"
        assert files.train.name == f"{name}.train.parquet"
        assert files.heldout.name == f"{name}.heldout.parquet"
        assert files.train_rows == len(rows(files)) > 0
        assert files.heldout_rows == len(rows(files, "heldout")) == 0  # heldout_percent=0
    assert sorted(p.name for p in ds["sft"].train.parent.iterdir()) == sorted(
        f"{n}.{s}.parquet" for n in DATASET_NAMES for s in ("train", "heldout")
    )


def test_comparisons_give_winner_over_loser_and_ties_give_nothing(built) -> None:
    _, ds = built
    assert pairs_for(ds["preference"], COMPARE) == {
        ("comparison", "A name-to-address lookup.", "Magic."),
        ("comparison", "A protocol.", "Magic."),
    }


def test_ranking_of_three_gives_three_ordered_pairs(built) -> None:
    _, ds = built
    assert pairs_for(ds["preference"], RANK) == {
        ("ranking", "git reset --soft HEAD~1", "git revert HEAD"),
        ("ranking", "git reset --soft HEAD~1", "rm -rf .git"),
        ("ranking", "git revert HEAD", "rm -rf .git"),
    }


def test_thumbs_pair_up_answers_with_down_answers_of_the_same_prompt(built) -> None:
    _, ds = built
    assert pairs_for(ds["preference"], THUMBS) == {
        ("thumbs", "No: raw flour and eggs.", "Yes!"),
        ("thumbs", "No: raw flour and eggs.", "Sure"),
    }
    assert pairs_for(ds["preference"], THUMBS_ALONE) == set()  # nothing up on that prompt


def test_edit_beats_the_original_unless_unchanged(built) -> None:
    _, ds = built
    haiku = "Grey rain on tin roofs /\nthe gutters hum their one note /\nthe cat stays inside"
    assert pairs_for(ds["preference"], EDIT) == {("edit", haiku, "Rain falls down a lot")}


def test_higher_mean_rating_beats_lower(built) -> None:
    _, ds = built
    assert pairs_for(ds["preference"], RATE) == {
        ("rating", "Hamlet, Act 3.", "Macbeth."),
        ("rating", "Hamlet (Act 3, Scene 1).", "Macbeth."),
    }


def test_kto_labels_from_net_thumbs(built) -> None:
    _, ds = built
    got = sorted(
        (r["prompt"][0]["content"], r["completion"][0]["content"], r["label"])
        for r in rows(ds["kto"])
    )
    assert got == sorted(
        [
            (THUMBS[0].content, "No: raw flour and eggs.", True),
            (THUMBS[0].content, "Yes!", False),
            (THUMBS[0].content, "Sure", False),  # -1 -1 +1
            (THUMBS_ALONE[0].content, "Bonsoir.", False),
        ]
    )
    assert all(r["completion"][0]["role"] == "assistant" for r in rows(ds["kto"]))


def test_sft_from_edits_and_well_rated_answers(built) -> None:
    _, ds = built
    got = sorted(
        tuple(m["content"] for m in r["prompt"] + r["completion"]) for r in rows(ds["sft"])
    )
    haiku = "Grey rain on tin roofs /\nthe gutters hum their one note /\nthe cat stays inside"
    rate = tuple(m.content for m in RATE)
    assert got == sorted(
        [
            (EDIT[0].content, haiku),
            (EDIT[0].content, "Soft rain on the roof"),  # an edit, even if unchanged
            (*rate, "Hamlet, Act 3."),  # mean 4
            (*rate, "Hamlet (Act 3, Scene 1)."),  # 4
        ]
    )
    multi_turn = [r for r in rows(ds["sft"]) if len(r["prompt"]) == 3]
    assert multi_turn[0]["prompt"] == msgs(RATE)  # roles, quotes, newline and dash round-trip
    assert [m["role"] for m in multi_turn[0]["completion"]] == ["assistant"]


def test_prompts_are_every_prompt_asked_once(built) -> None:
    """Feedback on their answers or not (`UNRATED` has none), whatever the answers."""
    _, ds = built
    asked = sorted(tuple(m["content"] for m in r["prompt"]) for r in rows(ds["prompts"]))
    every = (COMPARE, RANK, THUMBS, THUMBS_ALONE, EDIT, RATE, UNRATED)
    assert asked == sorted(tuple(m.content for m in prompt) for prompt in every)


def test_files_load_with_datasets_in_trl_columns(built, tmp_path: Path) -> None:
    _, ds = built
    for name, files in ds.items():
        data = load_split(files.train, cache_dir=tmp_path / "hf")
        empty = load_split(files.heldout, cache_dir=tmp_path / "hf")
        assert data.column_names == empty.column_names == TRL_COLUMNS[name]
        assert data.features == empty.features
        assert len(empty) == 0
        assert len(data) == files.train_rows
        first = data[0]
        for column in set(TRL_COLUMNS[name]) & {"prompt", "chosen", "rejected", "completion"}:
            assert all(set(m) == {"role", "content"} for m in first[column])
        if name == "kto":
            assert data.features["label"].dtype == "bool"
        if name == "sft":
            assert first["completion"][-1]["role"] == "assistant"


def test_split_by_prompt_hash_never_shares_a_prompt(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path / "feedback.duckdb") as store:
        # Submitted together so that they share commits: 400 commits one by one are slow.
        answers = []
        for n in range(40):
            prompt = (Message("system", "Be kind."), Message("user", f"Question number {n}?"))
            conv = store.new_conversation_id()
            for text in (f"Good answer {n}", f"Bad answer {n}", f"Other {n}"):
                answers.append(
                    Response(
                        store.new_response_id(),
                        conv,
                        prompt,
                        text,
                        "base-v0",
                        SamplingParams(),
                        16,
                        4,
                        50.0,
                    )
                )
        wait_all(store.submit_response(r) for r in answers)
        feedback = []
        for a, b, c in zip(answers[::3], answers[1::3], answers[2::3], strict=True):
            feedback += [
                Comparison(a.id, b.id, "a"),
                Ranking((a.id, c.id, b.id)),
                Thumbs(a.id, 1),
                Thumbs(b.id, -1),
                Edit(b.id, f"Fixed: {b.text}"),
                Rating(a.id, 5),
                Rating(b.id, 1),
            ]
        wait_all(store.submit_feedback(fb) for fb in feedback)
        snap = create_snapshot(store, tmp_path / "snapshots", ANY_RATER)
    out = tmp_path / "elsewhere"
    ds = build_datasets(snap.path, out, heldout_percent=50)

    for name, files in ds.items():
        assert files.train.parent == out
        sides = {}
        for split in ("train", "heldout"):
            hashes = set()
            for r in rows(files, split):
                prompt = r["prompt"]
                h = prompt_hash([Message(**m) for m in prompt])
                assert (heldout_bucket(h) < 50) == (split == "heldout"), (name, h)
                hashes.add(h)
            sides[split] = hashes
        assert sides["train"] and sides["heldout"], name
        assert not sides["train"] & sides["heldout"], name
        assert len(sides["train"] | sides["heldout"]) == 40
    per_prompt = {"preference": 1 + 3 + 1 + 1 + 1, "kto": 2, "sft": 2, "prompts": 1}
    for name, files in ds.items():
        assert files.train_rows + files.heldout_rows == 40 * per_prompt[name]


def heldout_bucket(prompt_hash: str) -> int:
    """The rule the SQL follows, written out: the bucket (0-99) of a prompt; prompts with
    bucket < heldout_percent are held out."""
    return int(prompt_hash[:BUCKET_HEX_CHARS], 16) % 100


def test_heldout_bucket_matches_the_documented_rule() -> None:
    assert heldout_bucket("3fa2c1d04e5f6a7b") == int("3fa2c1d0", 16) % 100 == 56
    assert heldout_bucket("0000000000000000") == 0
    assert heldout_bucket("ffffffffffffffff") == 4294967295 % 100


def test_heldout_percent_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0 to 100"):
        build_datasets(tmp_path, heldout_percent=101)


def test_a_regenerated_answer_the_person_went_on_from_beats_the_one_they_left(
    tmp_path: Path,
) -> None:
    """Regenerate gives a second answer to the same prompt in the same conversation; the next
    turn's history holds the answer kept. An answer nobody went on from says nothing."""
    with FeedbackStore(tmp_path / "feedback.duckdb") as store:
        f = Feed(store)
        first_ask = user("Name a prime.")
        left, kept = f.answers(first_ask, "Nine.", "Seven.")
        conv = f.conversations[first_ask]
        went_on = (*first_ask, Message("assistant", "Seven."), Message("user", "Another?"))
        f.conversations[went_on] = conv  # the same conversation, one turn on
        f.answer(went_on, "Eleven.")
        alone = user("Name a colour.")
        f.answers(alone, "Red.", "Blue.")  # regenerated, but the person did not go on
        snap = create_snapshot(store, tmp_path / "snapshots", ANY_RATER)
    preference = build_datasets(snap.path, heldout_percent=0)["preference"]
    assert pairs_for(preference, first_ask) == {("regenerate", "Seven.", "Nine.")}
    assert pairs_for(preference, alone) == set()
    assert {r["source"] for r in rows(preference)} == {"regenerate"}


def test_the_trust_policy_names_the_pair_sources_training_takes(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path / "feedback.duckdb") as store:
        f = Feed(store)
        a, b = f.answers(user("What is 2 + 2?"), "4", "5")
        f.feedback(Comparison(a, b, "a", rater_id="r1"), Edit(b, "4, of course", rater_id="u1"))
        built = {}
        for sources in ("all", "comparison", "edit,regenerate"):
            trust = TrustSettings(anonymous=True, pair_sources=sources, edits="all")
            snap = create_snapshot(store, tmp_path / sources, trust)
            preference = build_datasets(snap.path, heldout_percent=0)["preference"]
            built[sources] = {r["source"] for r in rows(preference)}
    assert built == {
        "all": {"comparison", "edit"},
        "comparison": {"comparison"},
        "edit,regenerate": {"edit"},
    }
    with pytest.raises(SettingsError, match="unknown pair source"):
        TrustSettings(pair_sources="comparison,gossip")
