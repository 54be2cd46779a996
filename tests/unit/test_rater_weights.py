"""Trust weights on a real DuckDB file: weights from agreement and gold, quarantine below 0.5,
weights through the snapshot into the preference dataset, and into the reward model's and DPO's
losses (real TRL trainers on the tiny models)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from job_datasets import msg, pairs

from tuneloop.core.records import Comparison, Message, Response, SamplingParams
from tuneloop.core.settings import TrustSettings
from tuneloop.feedback import accounts, raters
from tuneloop.feedback.agreement import Reliability, reliability
from tuneloop.feedback.datasets import build_datasets
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore

HONEST = ("ann", "bob", "cid", "dee")
FLIP = {**dict.fromkeys(HONEST, 0.1), "rnd": 0.5, "inv": 0.9}


def answer(store: FeedbackStore, prompt: str, text: str) -> int:
    r = Response(
        id=store.new_response_id(),
        conversation_id=store.new_conversation_id("uma"),
        prompt=(Message("user", prompt),),
        text=text,
        model_version_id="v1",
        params=SamplingParams(),
        prompt_tokens=3,
        completion_tokens=5,
        latency_ms=1.0,
        rater_id="uma",
    )
    store.submit_response(r).result()
    return r.id


@pytest.fixture
def store(tmp_path: Path):
    """40 pairs of answers, the first of each the better, each judged by 4 of 6 raters: four
    honest (10 % of verdicts flipped), one at random, one inverted; `new` judged 3, the user
    `uma` and the operator's import one each."""
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        for name in (*FLIP, "new"):
            accounts.add_account(s, name, "rater", actor="admin")
        accounts.add_account(s, "uma", "user", actor="admin")
        rng = random.Random(3)
        items = [
            (answer(s, f"q{i}", f"good answer {i}"), answer(s, f"q{i}", f"bad answer {i}"))
            for i in range(40)
        ]
        for good, bad in items:
            for rater in rng.sample(sorted(FLIP), 4):
                right = rng.random() >= FLIP[rater]
                s.submit_feedback(Comparison(good, bad, "a" if right else "b", rater)).result()
        for good, bad in items[:3]:
            s.submit_feedback(Comparison(good, bad, "a", "new")).result()
        s.submit_feedback(Comparison(*items[5], "a", "uma")).result()
        s.submit_feedback(Comparison(*items[6], "a", "import")).result()
        yield s


def test_honest_raters_weigh_more_than_half_random_and_inverted_ones_less(store) -> None:
    weights = raters.rater_weights(store)
    assert set(weights) == {*FLIP, "new"}  # not the user, not the import
    for name in HONEST:
        assert weights[name].weight > 0.5 and weights[name].fitted > 0.5, weights[name]
    assert weights["rnd"].weight < 0.3 and abs(weights["rnd"].fitted) < 0.3
    assert weights["inv"].weight == 0.0 and weights["inv"].fitted < -0.6
    # Three votes move a new rater little from the prior, and quarantine no one.
    assert abs(weights["new"].weight - raters.PRIOR_WEIGHT) < 0.1
    assert weights["new"].votes == 3 < raters.MIN_VOTES_TO_QUARANTINE


def test_reliability_is_the_rank_one_fit_of_agreement_with_gold_as_a_sure_partner() -> None:
    """Two raters who always agree and a third who always disagrees, on balanced verdicts:
    kappa is 1 and -1, so r = 1, 1, -1; gold alone gives 2 * accuracy - 1."""
    units = {i: {"a": str(i % 2), "b": str(i % 2), "c": str(1 - i % 2)} for i in range(10)}
    fit = reliability(units)
    assert [round(fit[n].value, 6) for n in "abc"] == [1.0, 1.0, -1.0]
    # Balanced verdicts, 3 of 4 right against gold: 2 * 0.75 - 1.
    gold = [("g", "1", "1"), ("g", "2", "2"), ("g", "1", "1"), ("g", "2", "1")]
    assert reliability({}, gold)["g"] == Reliability(0.5, 4.0)
    assert reliability({0: {"x": "1", "y": "1"}}) == {}  # one verdict throughout: nothing told


def test_apply_trust_quarantines_low_weights_with_their_reason(store) -> None:
    assert raters.apply_trust(store, TrustSettings(rater_weights=False)).quarantined == []
    update = raters.apply_trust(store, TrustSettings())
    assert update.quarantined == ["inv", "rnd"]
    assert update.weights["ann"].weight > 0.5
    reasons = {r["rater_id"]: r["reason"] for r in raters.quarantined(store)}
    rnd = update.weights["rnd"]
    assert rnd.weight <= rnd.optimistic < 0.5
    assert reasons["rnd"].startswith(
        f"trust weight {rnd.weight:.2f} < 0.5 (at best {rnd.optimistic:.2f}): reliability "
    )
    assert "shared judgments and gold 0/0" in reasons["rnd"]
    audit = store.read("SELECT actor, action, target FROM audit_log WHERE actor = 'tuneloop'")
    assert sorted(r["target"] for r in audit) == ["inv", "rnd"]
    assert {r["action"] for r in audit} == {"rater.quarantine"}
    assert raters.apply_trust(store, TrustSettings()).quarantined == []  # held already


def test_quarantine_waits_for_a_weight_low_even_at_its_optimistic_end() -> None:
    """15 votes at reliability 0.3 (right 65 % of the time: an honest rater's unlucky start)
    weigh 0.42, under half, but the reliability that would weigh half (0.43) is half a standard
    error away: not enough to hold them; at reliability 0 (a coin) or -1 (inverted), 15 votes
    are."""
    import math

    def weigh(r: float, n: float) -> tuple[float, float]:
        return raters._shrunk(r, n), raters._shrunk(r + 1.64 * raters._standard_error(r, n), n)

    assert raters.QUARANTINE_Z == 1.64
    weight, optimistic = weigh(0.3, 15)
    assert weight == pytest.approx((6 + 4.5) / 25) and optimistic > 0.5
    assert raters._standard_error(0.3, 15) == pytest.approx(math.sqrt(0.91 / 15))
    coin = weigh(0.0, 15)[1]
    assert coin == pytest.approx((6 + 15 * 1.64 / math.sqrt(15)) / 25) and coin < 0.5
    assert weigh(-1.0, 15) == (0.0, 0.0)
    assert raters._standard_error(-1.0, 15) == pytest.approx(1 / 15)  # not 0


@pytest.mark.parametrize("weighted", [True, False])
def test_the_snapshot_carries_weights_into_the_preference_pairs(
    store, tmp_path: Path, weighted: bool
) -> None:
    weights = raters.rater_weights(store)
    snap = create_snapshot(store, tmp_path / "snaps", TrustSettings(rater_weights=weighted))
    accounts_file = snap.path / snap.manifest["tables"]["accounts"]["file"]
    stored = {r["name"]: r["weight"] for r in pq.read_table(accounts_file).to_pylist()}
    expected = {name: w.weight if weighted else 1.0 for name, w in weights.items()}
    assert stored == {**expected, "uma": 1.0}

    built = build_datasets(snap.path, heldout_percent=0)["preference"]
    rows = pq.read_table(built.train).to_pylist()
    assert pq.read_schema(built.train).field("weight").type == "double"
    comparisons = store.read("SELECT rater_id FROM comparisons WHERE winner IN ('a', 'b')")
    # Pairs of weight 0 (the inverted rater's, when weighted) are left out.
    kept = [r["rater_id"] for r in comparisons if not (weighted and r["rater_id"] == "inv")]
    assert len(rows) == len(kept)
    by_weight = sorted(round(r["weight"], 9) for r in rows)
    voters = {**expected, "uma": 1.0, "import": 1.0}
    assert by_weight == sorted(round(voters[name], 9) for name in kept)


# --- Losses ---------------------------------------------------------------------------------------


def weighted_rows(weights: list[float]) -> list[dict[str, Any]]:
    rows = pairs(len(weights), 0, random.Random(1))
    rows[1]["chosen"] = msg("assistant", "A longer answer that says rather more than the others.")
    return [{**row, "weight": w} for row, w in zip(rows, weights, strict=True)]


def first_batch(trainer: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch TRL's own eval dataloader makes of `rows` (in order): columns pruned as in
    training, the collator's output."""
    import datasets

    data = trainer._prepare_dataset(
        datasets.Dataset.from_list(rows), trainer.processing_class, trainer.args, "eval"
    )
    return next(iter(trainer.get_eval_dataloader(data)))


WEIGHTS = [1.0, 0.0, 0.5, 0.25]


def check_weighted_loss(trainer: Any, unweighted_loss: Any) -> None:
    """loss(batch, w) = sum(w_i * l_i) / n, with l_i TRL's own loss of pair i alone; weights of
    1 give TRL's own loss of the batch."""
    import torch

    rows = weighted_rows(WEIGHTS)
    with torch.no_grad():
        batch = first_batch(trainer, rows)
        assert batch["weight"].tolist() == WEIGHTS  # kept past the column pruning
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        alone = []
        for row in rows:
            single = first_batch(trainer, [row])
            single.pop("weight")
            alone.append(unweighted_loss(single).item())
        ones = dict(batch, weight=torch.ones(len(rows)))
        full = trainer.compute_loss(trainer.model, ones).item()
    assert len(set(round(x, 4) for x in alone)) == len(alone)  # the pairs' losses differ
    expected = sum(w * x for w, x in zip(WEIGHTS, alone, strict=True)) / len(rows)
    assert loss == pytest.approx(expected, rel=1e-4)
    assert full == pytest.approx(sum(alone) / len(rows), rel=1e-4)
    assert loss < full


def test_trust_weights_change_the_reward_models_loss(tmp_path: Path, tiny_model_dir: Path):
    import datasets
    from trl import RewardConfig, RewardTrainer

    from tuneloop.core.artifacts import load_tokenizer
    from tuneloop.train.job_config import build_config
    from tuneloop.train.reward_job import load_backbone
    from tuneloop.train.weighted import WeightedRewardTrainer

    tokenizer = load_tokenizer(tiny_model_dir)
    config, _ = build_config(RewardConfig, [{"per_device_eval_batch_size": 4}], output_dir=tmp_path)
    model = load_backbone(tiny_model_dir, pad_token_id=tokenizer.pad_token_id)
    trainer = WeightedRewardTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(weighted_rows(WEIGHTS)),
        processing_class=tokenizer,
    )
    check_weighted_loss(
        trainer, lambda batch: RewardTrainer.compute_loss(trainer, trainer.model, batch)
    )


def test_trust_weights_change_dpos_loss(
    tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path
) -> None:
    """The policy (seed 1) differs from the reference (seed 0), so every pair has its own
    loss; the weighted path with weights of 1 is TRL's sigmoid loss exactly."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneloop.core.artifacts import load_tokenizer
    from tuneloop.train.job_config import build_config
    from tuneloop.train.weighted import WeightedDPOTrainer

    config, _ = build_config(DPOConfig, [{"per_device_eval_batch_size": 4}], output_dir=tmp_path)
    trainer = WeightedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir_b),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        train_dataset=datasets.Dataset.from_list(weighted_rows(WEIGHTS)),
        processing_class=load_tokenizer(tiny_model_dir),
    )

    def trl_loss(batch: dict[str, Any]) -> Any:
        return DPOTrainer._compute_loss(trainer, trainer.model, dict(batch), False)

    check_weighted_loss(trainer, trl_loss)
    with torch.no_grad():
        batch = first_batch(trainer, weighted_rows(WEIGHTS))
        batch.pop("weight")
        ours = trainer._weighted_loss(trainer.model, dict(batch), torch.ones(len(WEIGHTS)))
        assert ours.item() == pytest.approx(trl_loss(batch).item(), rel=1e-6)


def test_trust_weights_weigh_each_chosen_answers_tokens_in_rpos_sft_term(
    tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path
) -> None:
    """RPO, as bon trains (DPO's sigmoid loss and TRL's `sft` term): with weights of 1 the
    weighted path is TRL's loss exactly; with weights, the sft term is TRL's mean over the chosen
    answers' tokens with each answer's tokens weighing its pair's weight."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneloop.core.artifacts import load_tokenizer
    from tuneloop.train.job_config import build_config
    from tuneloop.train.scored_pairs import BON_DEFAULTS
    from tuneloop.train.weighted import WeightedDPOTrainer

    rpo = {key: BON_DEFAULTS[key] for key in ("loss_type", "loss_weights")}
    assert rpo == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}
    config, _ = build_config(DPOConfig, [rpo], output_dir=tmp_path)
    rows = weighted_rows(WEIGHTS)
    trainer = WeightedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir_b),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(tiny_model_dir),
    )

    def trl_loss(batch: dict[str, Any]) -> float:
        return DPOTrainer._compute_loss(trainer, trainer.model, dict(batch), False).item()

    def ours(batch: dict[str, Any], weights: list[float]) -> float:
        return trainer._weighted_loss(trainer.model, dict(batch), torch.tensor(weights)).item()

    with torch.no_grad():
        batch = first_batch(trainer, rows)
        batch.pop("weight")
        assert ours(batch, [1.0] * len(rows)) == pytest.approx(trl_loss(batch), rel=1e-6)
        trainer.loss_weights = [0.0, 1.0]  # the sft term alone
        alone, tokens = [], []
        for row in rows:
            single = first_batch(trainer, [row])
            single.pop("weight")
            alone.append(trl_loss(single))  # the chosen answer's mean token NLL
            tokens.append(single["completion_mask"][0, 1:].sum().item())
        weighted = ours(batch, WEIGHTS)
    assert len(set(tokens)) > 1  # answers of different lengths: a token mean, not a pair mean
    expected = sum(w * nll * n for w, nll, n in zip(WEIGHTS, alone, tokens, strict=True))
    assert weighted == pytest.approx(expected / sum(tokens), rel=1e-4)


def test_trust_weights_share_out_the_push_and_do_not_shrink_it() -> None:
    """The people's pairs reach training with weights of mean 1, in the raters' proportions."""
    import datasets

    from tuneloop.train.weighted import relative_trust

    rows = weighted_rows([1.0, 0.5, 0.25, 0.25])
    relative = relative_trust(datasets.Dataset.from_list(rows))
    assert relative["weight"] == pytest.approx([2.0, 1.0, 0.5, 0.5])
    assert relative["chosen"] == [r["chosen"] for r in rows]
    unweighted = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "weight"}
                                             for r in rows])  # fmt: skip
    assert relative_trust(unweighted)["chosen"] == unweighted["chosen"]


def test_dpo_refuses_weights_with_another_objective(tmp_path: Path, tiny_model_dir: Path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from tuneloop.core.artifacts import load_tokenizer
    from tuneloop.train.job_config import JobError, build_config
    from tuneloop.train.weighted import WeightedDPOTrainer

    config, _ = build_config(DPOConfig, [{"loss_type": ["ipo"]}], output_dir=tmp_path)
    make = dict(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        processing_class=load_tokenizer(tiny_model_dir),
    )
    with pytest.raises(JobError, match="trust weights need DPO's sigmoid loss"):
        WeightedDPOTrainer(train_dataset=datasets.Dataset.from_list(weighted_rows(WEIGHTS)), **make)
    ones = weighted_rows([1.0] * 4)
    WeightedDPOTrainer(train_dataset=datasets.Dataset.from_list(ones), **make)  # as TRL's own


@pytest.mark.parametrize("job", ["rm", "dpo"])
def test_jobs_train_on_weighted_pairs(job: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The job's own path: the weights survive TRL's preparation into training and the held-out
    evaluation (DPO logs their mean), and the version is written as ever."""
    import pyarrow as pa
    from job_datasets import SCHEMAS, write_split

    from tuneloop.core.artifacts import read_manifest
    from tuneloop.core.job_spec import JobSpec
    from tuneloop.core.settings import JobSettings
    from tuneloop.train.run import train_version

    schema = SCHEMAS["preference"].append(pa.field("weight", pa.float64()))
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 16), ("heldout", 4)):
        rows = weighted_rows([0.25, 1.0, 0.5, 0.75] * (n // 4))
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, data / f"preference.{split}.parquet")
    write_split(data, "kto", "train", [])  # no thumbs: the reward model's rows are the pairs
    settings = JobSettings(overrides={"max_steps": 2, "per_device_train_batch_size": 4})
    spec = JobSpec(job, data, tiny_model_dir, tmp_path / "v", "v", settings=settings)
    manifest = read_manifest(train_version(spec))
    assert manifest["data"]["preference"] == {"train": 16, "too_long": 0, "heldout": 4}
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["train_loss"] is not None
    if job == "dpo":
        assert manifest["metrics"]["heldout_trust_weight"] == pytest.approx(0.625)
