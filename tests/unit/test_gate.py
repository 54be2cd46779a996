"""Reward scoring, pairwise accuracy and the promotion gate, on tiny local models."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneloop.core.artifacts import write_manifest
from tuneloop.core.job_spec import GateSpec
from tuneloop.core.records import Message
from tuneloop.core.settings import GateSettings
from tuneloop.feedback.importer import PreferencePair
from tuneloop.train import gate, scoring
from tuneloop.train.gate import (
    GateResult,
    decide,
    evaluate_candidate,
    gate_prompts,
    wilson_interval,
)
from tuneloop.train.scoring import RewardScorer, pairwise_accuracy

TOPICS = ["lists", "tuples", "files", "strings", "numbers", "classes", "modules", "loops"]
REFUSALS = ["No.", "Go away.", "I will not say."]


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """A learnable preference: an answer about the topic beats a refusal."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        pairs.append(
            PreferencePair(
                (Message("user", f"Tell me about {topic}."),),
                f"Here is a clear answer about {topic}.",
                rng.choice(REFUSALS),
            )
        )
    return pairs


def trl_ids(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """What TRL 1.16's RewardTrainer feeds the model for a conversational pair side."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the two
    threads spin waiting for each other (one gate run here went from under 1 s to 25 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward version dir: the tiny model with a score head, trained a few Bradley-Terry steps
    on TRL-formatted synthetic pairs (a plain loop: the Trainer's setup costs several seconds)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = synthetic_pairs(32, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(6):
            batch = pairs[(step % 4) * 8 : (step % 4 + 1) * 8]
            seqs = [trl_ids(tokenizer, p.prompt_dicts(), p.chosen) for p in batch]
            seqs += [trl_ids(tokenizer, p.prompt_dicts(), p.rejected) for p in batch]
            padded = tokenizer.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt")
            rewards = model(**padded).logits[:, 0]
            loss = -torch.nn.functional.logsigmoid(rewards[:8] - rewards[8:]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    out = tmp_path_factory.mktemp("reward")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_manifest(out, {"kind": "reward", "base": str(tiny_model_dir)})
    return out


@pytest.fixture(scope="module")
def scorer(reward_model_dir: Path) -> RewardScorer:
    return RewardScorer(reward_model_dir, device="cpu", batch_size=4)


PROMPTS = [[{"role": "user", "content": f"Tell me about {t}."}] for t in TOPICS]
A = {"role": "assistant", "content": "An answer."}


# ---- scoring -------------------------------------------------------------------------------------


def test_scorer_formats_like_trl_and_batching_changes_nothing(scorer: RewardScorer) -> None:
    prompts = [*PROMPTS[:3], [{"role": "user", "content": "Explain. " * 20}]]
    answers = ["Here is a clear answer about lists.", "No.", "A much longer answer " * 5, "Ok."]
    assert scorer.encode(prompts, answers) == [
        trl_ids(scorer.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)
    ]
    together = scorer.score(prompts, answers)  # mixed lengths: right padding within a batch
    alone = [scorer.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)
    assert scorer.score([], []) == []


def test_long_conversations_keep_their_end(scorer: RewardScorer) -> None:
    long_prompt = [{"role": "user", "content": "Tell me about everything there is. " * 200}]
    full = trl_ids(scorer.tokenizer, long_prompt, "Here is a clear answer about files.")
    assert len(full) > scorer.max_length == 512
    (kept,) = scorer.encode([long_prompt], ["Here is a clear answer about files."])
    assert kept == full[-scorer.max_length :]
    good, bad = scorer.score([long_prompt] * 2, ["Here is a clear answer about files.", "No."])
    assert good == pytest.approx(scorer.score_ids([kept])[0], abs=1e-4)
    assert good != bad  # the answers survived truncation: the prompt alone would tie them


def test_pairwise_accuracy_of_the_trained_reward_model(scorer: RewardScorer) -> None:
    result = pairwise_accuracy(scorer, synthetic_pairs(24, seed=1))
    assert result["pairs"] == 24
    assert result["accuracy"] >= 0.9
    assert result["margin"] > 0


def test_pairwise_accuracy_counts_ties_half() -> None:
    class Constant:
        def score(self, prompts: list, completions: list) -> list[float]:
            return [1.0] * len(completions)

    result = pairwise_accuracy(Constant(), synthetic_pairs(4, seed=2))  # type: ignore[arg-type]
    assert result == {"accuracy": 0.5, "margin": 0.0, "pairs": 4}


def test_scoring_cli_prints_json(
    reward_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {
            "prompt": p.prompt_dicts(),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in synthetic_pairs(10, seed=3)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--reward-model", str(reward_model_dir), "--data", str(data), "--json"]
    assert scoring.main([*argv, "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"accuracy", "margin", "pairs"}
    assert printed["pairs"] == 10
    assert printed["accuracy"] >= 0.9


# ---- sampling ------------------------------------------------------------------------------------


def test_answers_are_sampled_from_the_whole_vocabulary(tiny_model_dir: Path) -> None:
    """No top-k, as the server samples: transformers would cut every step to the 50 likeliest
    tokens unless told otherwise. At temperature 50 the tiny model's next token is close to
    uniform over 1024, so 128 draws give about 120 distinct first tokens; top-k 50 allows 50."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.train.sampling import sample_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size >= 1000
    sampled = sample_answers(
        model,
        tokenizer,
        PROMPTS[:1] * 128,
        max_tokens=1,
        temperature=50.0,
        top_p=1.0,
        seed=0,
        batch_size=128,
    )
    assert all(len(answer) == 1 for answer in sampled.answer_ids)
    assert len({answer[0] for answer in sampled.answer_ids}) > 50


# ---- the gate ------------------------------------------------------------------------------------


def test_a_policy_against_itself_ties_everywhere(
    tiny_model_dir: Path, reward_model_dir: Path
) -> None:
    """Same weights, same seed: the same answers, so every prompt ties and the KL is exactly 0."""
    progress: list[float] = []
    result = evaluate_candidate(
        tiny_model_dir,
        tiny_model_dir,
        reward_model_dir,
        PROMPTS,
        max_tokens=12,
        device="cpu",
        on_progress=progress.append,
    )
    assert progress == sorted(progress) and len(progress) >= 2
    assert (result.wins, result.ties, result.losses, result.prompts) == (0, 8, 0, 8)
    assert result.win_rate == 0.5
    assert result.kl_to_parent == 0.0
    assert result.mean_reward_candidate == result.mean_reward_incumbent
    assert result.ci_low < 0.5 < result.ci_high


def test_gate_cli_on_a_datasets_dir_against_another_policy(
    tiny_model_dir: Path, tiny_model_dir_b: Path, reward_model_dir: Path, tmp_path: Path
) -> None:
    """The pipeline's call: prompts from held-out splits + MT-bench, a status file, a decision."""
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    rows = [{"prompt": p, "completion": [A]} for p in PROMPTS[:5]]
    pq.write_table(pa.Table.from_pylist(rows), datasets / "sft.heldout.parquet")
    mt_bench = tmp_path / "questions.jsonl"
    mt_bench.write_text(
        "".join(json.dumps({"turns": [f"Q{i}?", "More."]}) + "\n" for i in range(9))
    )
    out, status = tmp_path / "gate.json", tmp_path / "status.json"
    settings = GateSettings(
        min_win_rate=0.0,
        max_kl=1e-9,
        max_prompts=10,
        max_tokens=12,
        batch_size=3,
        device="cpu",
        mt_bench=mt_bench,
    )
    spec = GateSpec(
        tiny_model_dir_b, tiny_model_dir, reward_model_dir, out, datasets, None, status, settings
    )
    assert gate.main([str(spec.write(tmp_path / "spec.json"))]) == 0

    written = json.loads(out.read_text())
    result = GateResult.from_dict(written)
    assert result.prompts == 10 == result.wins + result.ties + result.losses
    # Other weights: the KL is measured, and past the limit that refuses the candidate.
    assert math.isfinite(result.kl_to_parent) and result.kl_to_parent > settings.max_kl
    assert 0 <= result.ci_low <= result.win_rate <= result.ci_high <= 1
    assert result.win_rate == (result.wins + result.ties / 2) / 10
    assert written["promote"] is False
    assert "clears the bar 0.00; KL to parent" in written["reason"]
    assert "exceeds the limit 1e-09; answers " in written["reason"]
    assert result.mean_tokens_candidate > 0 and result.mean_tokens_incumbent > 0
    assert written["length_ratio"] == result.length_ratio
    done = json.loads(status.read_text())
    assert (done["job"], done["state"], done["progress"]) == ("gate", "done", 1.0)


def test_gate_cli_marks_its_status_failed(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    status = tmp_path / "status.json"
    c, i, r = (tmp_path / name for name in "cir")
    spec = GateSpec(c, i, r, tmp_path / "o.json", prompts=tmp_path / "empty.jsonl", status=status)
    with pytest.raises(ValueError, match="at least one prompt"):
        gate.main([str(spec.write(tmp_path / "spec.json"))])
    failed = json.loads(status.read_text())
    assert failed["state"] == "failed"
    assert failed["error"] == "ValueError: the gate needs at least one prompt"


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 60 of 100: center (0.6 + z²/200) / (1 + z²/100), half-width
    # z / (1 + z²/100) * sqrt(0.6 * 0.4 / 100 + z² / 40000), with z = 1.96.
    low, high = wilson_interval(60, 100)
    assert (low, high) == pytest.approx((0.50200, 0.69064), abs=5e-5)
    # None of 10: the lower end is 0 and the upper one z² / (n + z²).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8415 / 13.8415), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _result(win_rate: float, low: float, high: float, kl: float | None = 0.02) -> GateResult:
    return GateResult(win_rate, low, high, 70, 9, 41, 120, kl, 1.0, 0.5)


def test_decide_gives_its_reason() -> None:
    assert decide(_result(0.62, 0.55, 0.69)) == (
        True,
        "win rate 0.62 [0.55, 0.69] over 120 prompts clears the bar 0.55",
    )
    assert decide(_result(0.62, 0.53, 0.70), use_lower_bound=True) == (
        False,
        "win rate 0.62 [0.53, 0.70] over 120 prompts: its lower bound is below the bar 0.55",
    )
    assert decide(_result(0.5, 0.41, 0.59), min_win_rate=0.5) == (
        True,
        "win rate 0.50 [0.41, 0.59] over 120 prompts clears the bar 0.50",
    )
    promote, reason = decide(_result(0.7, 0.6, 0.8, kl=0.31), max_kl=0.2)
    assert not promote
    assert reason.endswith("clears the bar 0.55; KL to parent 0.31 exceeds the limit 0.2")
    assert decide(_result(0.7, 0.6, 0.8), max_kl=0.2)[0]
    assert not decide(_result(0.7, 0.6, 0.8, kl=None), max_kl=0.2)[0]


def test_the_reward_models_gate_and_the_human_gate_pass_a_candidate_at_the_bar() -> None:
    from tuneloop.feedback.canary import verdict

    assert decide(_result(0.55, 0.45, 0.65), min_win_rate=0.55)[0]
    assert not decide(_result(0.54, 0.44, 0.64), min_win_rate=0.55)[0]
    # Four ties: the win rate is 0.5 with no spread, so its interval's lower end is 0.5 too.
    assert verdict([0.5] * 4, min_judgments=4, min_win_rate=0.5).decision == "promote"
    assert verdict([0.5] * 4, min_judgments=4, min_win_rate=0.51).decision == "reject"


def test_gate_prompts_the_fixed_set_first_then_heldout_splits(tmp_path: Path) -> None:
    def msgs(*turns: str) -> list[dict]:
        roles = ["user", "assistant"]
        return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]

    answer = msgs("x", "y")[1:]
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": msgs("q1"), "chosen": answer, "rejected": answer}] * 2
            + [{"prompt": msgs("q2", "a", "q3"), "chosen": answer, "rejected": answer}]
        ),
        tmp_path / "preference.heldout.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([{"prompt": msgs("q1"), "completion": answer, "label": True}]),
        tmp_path / "kto.heldout.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([{"prompt": msgs("q4"), "completion": msgs("x", "a4")[1:]}]),
        tmp_path / "sft.heldout.parquet",
    )
    mt_bench = tmp_path / "questions.jsonl"
    question = {"question_id": 81, "category": "writing", "turns": ["Write.", "Rewrite."]}
    mt_bench.write_text(json.dumps(question) + "\n")
    paths = [tmp_path / f"{n}.heldout.parquet" for n in ("preference", "kto", "sft")]

    prompts = gate_prompts(paths, mt_bench)
    # The fixed set first: a flood of traffic cannot crowd it out.
    assert prompts == [msgs("Write."), msgs("q1"), msgs("q2", "a", "q3"), msgs("q4")]
    assert gate_prompts(paths, limit=2) == [msgs("q1"), msgs("q2", "a", "q3")]
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "Name a prime."}) + "\n")
    assert gate_prompts(paths, own, limit=2) == [msgs("Name a prime."), msgs("q1")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert gate.load_prompts(path) == prompts


def test_a_candidate_whose_answers_grew_too_long_is_refused() -> None:
    """Reward hacking by length: reported beside the win rate, refused past the limit."""
    longer = GateResult(0.8, 0.7, 0.9, 90, 12, 18, 120, 0.05, 1.0, 0.5, 60.0, 20.0)
    assert longer.length_ratio == 3.0 and longer.to_dict()["length_ratio"] == 3.0
    promote, reason = decide(longer, max_length_ratio=2.0)
    assert not promote
    assert reason.endswith("; answers 60.0 tokens against 20.0 (3.00x), past the limit 2x")
    promote, reason = decide(longer, max_length_ratio=4.0)
    assert promote and reason.endswith("(3.00x)")
    assert decide(longer)[0]  # no limit
    assert GateResult.from_dict(longer.to_dict()) == longer
