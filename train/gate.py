"""The promotion gate: does a candidate policy beat the incumbent, as the reward model sees it?

Both policies answer every prompt with the same sampling settings and seeds; the reward model
scores both answers; the candidate wins a prompt when its answer scores higher (identical answers,
or equal scores, are a tie and count half). The win rate comes with a 95% Wilson score interval:
each prompt is one trial, ties count as half a success. Unlike the normal approximation, Wilson's
interval stays inside [0, 1] and keeps sensible coverage for small counts and rates near 0 or 1.
Counting ties as half makes it slightly conservative (ties have less variance than coin flips).

KL to parent is the mean per-token KL(candidate || incumbent) over the candidate's own sampled
answers: at every answer position (the end-of-turn token included) the exact KL between the two
models' next-token distributions, summed over the vocabulary, then averaged over all answer tokens.
This is the expectation of the usual log-prob-difference estimator (log p_c(y_t) - log p_i(y_t))
over the token, so it has less variance and is never negative; only the positions visited are
sampled. Both are the models' raw distributions (temperature 1, no top-p): the divergence of the
policies themselves, not of the samplers. It needs a shared tokenizer; otherwise it is None.

    python -m tuneloop.train.gate SPEC.json

runs the `tuneloop.core.job_spec.GateSpec` in SPEC.json and writes the GateResult as JSON to its
`out`, plus `promote` and `reason` from `decide`. Prompts come from a file (one JSON list of
{role, content} messages a line) or from a datasets dir (`gate_prompts` over
its held-out splits, then MT-bench: the questions shipped in `data/` unless the settings'
`mt_bench` names others). The status file follows the training jobs' (`StatusFile`): "running"
with progress, then "done" or "failed" with the error. The loop runs this as a subprocess, so
the server never holds the models twice.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneloop.core.artifacts import load_causal_lm, load_tokenizer
from tuneloop.core.files import write_json_atomic
from tuneloop.core.job_spec import GateSpec
from tuneloop.core.settings import GateSettings, clears_bar
from tuneloop.train.sampling import mean_token_kl, sample_answers

# Shipped with tuneloop (Apache-2.0, see data/README.md): the gate's prompts besides held-out ones.
DEFAULT_MT_BENCH = Path(__file__).resolve().parent / "data" / "mt-bench-questions.jsonl"
HELDOUT_SPLITS = ("preference", "kto", "sft")

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class GateResult:
    win_rate: float  # (wins + ties / 2) / prompts
    ci_low: float  # 95% Wilson score interval of the win rate
    ci_high: float
    wins: int
    ties: int
    losses: int
    prompts: int
    kl_to_parent: float | None  # mean per-token KL(candidate || incumbent); None: tokenizers differ
    mean_reward_candidate: float
    mean_reward_incumbent: float
    # Mean answer length in tokens (the end-of-turn token included), to see a policy that
    # games its reward by talking longer (`decide`'s `max_length_ratio`).
    mean_tokens_candidate: float = 0.0
    mean_tokens_incumbent: float = 0.0

    @property
    def length_ratio(self) -> float | None:
        """The candidate's mean answer length over the incumbent's (None: no incumbent tokens)."""
        if self.mean_tokens_incumbent <= 0:
            return None
        return self.mean_tokens_candidate / self.mean_tokens_incumbent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"length_ratio": self.length_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n` ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def evaluate_candidate(
    candidate_dir: str | Path,
    incumbent_dir: str | Path,
    reward_model_dir: str | Path,
    prompts: list[list[dict]],
    *,
    max_tokens: int = GateSettings.max_tokens,
    temperature: float = GateSettings.temperature,
    top_p: float = GateSettings.top_p,
    seed: int = GateSettings.seed,
    device: str | None = GateSettings.device,
    batch_size: int = GateSettings.batch_size,
    on_progress: Callable[[float], None] | None = None,
) -> GateResult:
    """Sample both policies on `prompts`, score the answers, compare; see the module doc.

    The two policies are held together (for the KL), then freed before the reward model loads.
    `on_progress(fraction)` is called as the stages finish."""
    from tuneloop.train.scoring import RewardScorer, default_device

    if not prompts:
        raise ValueError("the gate needs at least one prompt")
    device = device or default_device()
    progress = on_progress or (lambda fraction: None)
    settings = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    settings |= {"seed": seed, "batch_size": batch_size}
    cand_model = load_causal_lm(candidate_dir, device=device)
    cand_tok = load_tokenizer(candidate_dir)
    cand = sample_answers(cand_model, cand_tok, prompts, **settings)
    progress(0.4)
    inc_model = load_causal_lm(incumbent_dir, device=device)
    inc_tok = load_tokenizer(incumbent_dir)
    inc = sample_answers(inc_model, inc_tok, prompts, **settings)
    progress(0.75)
    kl = None
    same_vocab = cand_model.config.vocab_size == inc_model.config.vocab_size
    if same_vocab and cand_tok.get_vocab() == inc_tok.get_vocab():
        kl = mean_token_kl(cand_model, inc_model, cand, batch_size)
    del cand_model, inc_model
    _free_memory(device)
    progress(0.85)

    scorer = RewardScorer(reward_model_dir, device=device, batch_size=batch_size)
    cand_scores = scorer.score(prompts, cand.texts)
    inc_scores = scorer.score(prompts, inc.texts)
    wins = ties = 0
    for c_text, i_text, c, i in zip(cand.texts, inc.texts, cand_scores, inc_scores, strict=True):
        if c_text == i_text or c == i:
            ties += 1
        elif c > i:
            wins += 1
    n = len(prompts)
    low, high = wilson_interval(wins + ties / 2, n)
    return GateResult(
        win_rate=(wins + ties / 2) / n,
        ci_low=low,
        ci_high=high,
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        prompts=n,
        kl_to_parent=kl,
        mean_reward_candidate=sum(cand_scores) / n,
        mean_reward_incumbent=sum(inc_scores) / n,
        mean_tokens_candidate=sum(map(len, cand.answer_ids)) / n,
        mean_tokens_incumbent=sum(map(len, inc.answer_ids)) / n,
    )


def decide(
    result: GateResult,
    *,
    min_win_rate: float = GateSettings.min_win_rate,
    use_lower_bound: bool = False,
    max_kl: float | None = None,
    max_length_ratio: float | None = None,
) -> tuple[bool, str]:
    """Promote or not, with the reason in words. With `use_lower_bound`, the interval's lower
    end must clear the bar (the candidate is better with 97.5% confidence), not the point estimate.
    With `max_kl`, a candidate too far from its parent (or of unknown distance) is rejected; with
    `max_length_ratio`, one whose answers grew that many times longer."""
    stat = result.ci_low if use_lower_bound else result.win_rate
    passed = clears_bar(stat, min_win_rate)
    reason = (
        f"win rate {result.win_rate:.2f} [{result.ci_low:.2f}, {result.ci_high:.2f}] over "
        f"{result.prompts} prompts{': its lower bound' if use_lower_bound else ''} "
        f"{'clears' if passed else 'is below'} the bar {min_win_rate:.2f}"
    )
    if max_kl is not None:
        kl = result.kl_to_parent
        if kl is None:
            passed = False
            reason += f"; KL to parent unknown (tokenizers differ), limit {max_kl:.3g}"
        elif kl > max_kl:
            passed = False
            reason += f"; KL to parent {kl:.3g} exceeds the limit {max_kl:.3g}"
        else:
            reason += f"; KL to parent {kl:.3g} is within the limit {max_kl:.3g}"
    ratio = result.length_ratio
    if ratio is not None:
        reason += (
            f"; answers {result.mean_tokens_candidate:.1f} tokens against "
            f"{result.mean_tokens_incumbent:.1f} ({ratio:.2f}x)"
        )
        if max_length_ratio is not None and ratio > max_length_ratio:
            passed = False
            reason += f", past the limit {max_length_ratio:.3g}x"
    return passed, reason


def gate_prompts(
    heldout_parquet_paths: Iterable[str | Path],
    mt_bench_path: str | Path | None = None,
    *,
    limit: int | None = None,
) -> list[list[dict]]:
    """Unique prompts for the gate: the operator's fixed set first (JSON lines, each a `prompt`
    or MT-bench's `turns`, whose first turn is taken), then those of the held-out dataset splits
    (every dataset's `prompt` column), which come from traffic; the first `limit` of them. The
    fixed set comes first so that no flood of traffic can crowd it out."""
    import pyarrow.parquet as pq

    found: dict[str, list[dict]] = {}

    def add(messages: list[dict]) -> None:
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
        if prompt and prompt[-1]["role"] == "user":
            found.setdefault(json.dumps(prompt, ensure_ascii=False), prompt)

    if mt_bench_path is not None:
        with open(mt_bench_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    add([{"role": "user", "content": row.get("prompt") or row["turns"][0]}])
    for path in heldout_parquet_paths:
        table = pq.read_table(path)
        if "prompt" not in table.column_names:
            raise ValueError(f"{path}: no prompt column")
        for prompt in table.column("prompt").to_pylist():
            add(prompt)
    prompts = list(found.values())
    return prompts if limit is None else prompts[:limit]


def load_prompts(path: str | Path) -> list[list[dict]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m tuneloop.train.gate SPEC.json", file=sys.stderr)
        return 2
    spec = GateSpec.read(Path(args[0]))

    from tuneloop.train.job_common import StatusFile

    status = StatusFile(spec.status, "gate", spec.candidate.name)
    status.stage = "comparing"
    status.write("running", progress=0.0)
    try:
        result = run_gate(spec, lambda fraction: status.write("running", progress=fraction))
    except BaseException as exc:
        status.write("failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        raise
    write_json_atomic(spec.out, result)
    status.metrics = result
    status.write("done", progress=1.0)
    kl = "unknown" if result["kl_to_parent"] is None else f"{result['kl_to_parent']:.4f}"
    print(f"{'promote' if result['promote'] else 'reject'}: {result['reason']} (KL {kl})")
    return 0


def run_gate(spec: GateSpec, on_progress: Callable[[float], None]) -> dict[str, Any]:
    """The gate minus its bookkeeping: prompts, evaluation, decision."""
    settings = spec.settings
    if spec.prompts is not None:
        prompts = load_prompts(spec.prompts)[: settings.max_prompts]
    else:
        assert spec.datasets is not None  # GateSpec.check
        heldout = [spec.datasets / f"{name}.heldout.parquet" for name in HELDOUT_SPLITS]
        mt_bench = settings.mt_bench or (DEFAULT_MT_BENCH if DEFAULT_MT_BENCH.exists() else None)
        prompts = gate_prompts(
            [p for p in heldout if p.exists()], mt_bench, limit=settings.max_prompts
        )
    result = evaluate_candidate(
        spec.candidate,
        spec.incumbent,
        spec.reward_model,
        prompts,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        device=settings.device,
        batch_size=settings.batch_size,
        on_progress=on_progress,
    )
    promote, reason = decide(
        result,
        min_win_rate=settings.min_win_rate,
        use_lower_bound=settings.use_lower_bound,
        max_kl=settings.max_kl,
        max_length_ratio=settings.max_length_ratio,
    )
    return result.to_dict() | {"promote": promote, "reason": reason}


if __name__ == "__main__":
    sys.exit(main())
