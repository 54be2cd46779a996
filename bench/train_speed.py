"""Benchmark: how close TRL's DPO and reward-model steps on a CPU come to the machine's matmul
speed, for variants of the job settings measured side by side in one run.

What it measures, for each variant and job, in a process of its own (so that environment
variables such as OMP_WAIT_POLICY take effect before torch loads):

- the machine's matmul peak at that moment: the best of 5 fp32 (and bf16) 2048x2048x2048
  `torch.mm` calls with the variant's thread count, taken before and after the steps (the higher
  of the two is the peak the step is judged against; both are printed, as a noise gauge);
- `--steps` optimizer steps of the job after `--warmup` untimed ones: seconds per step, from the
  trainer's `on_step_end` callbacks (a step includes fetching and collating its batch, the
  forward and backward passes, the optimizer and TRL's metrics);
- the batches themselves (the trainer's collator is wrapped): padded tokens (what the model
  runs on), real tokens (attention mask) and completion tokens (DPO's completion mask).

Jobs (`--jobs`):

- `dpo`: `trl.DPOTrainer`, LoRA through `peft_config`, the reference being the base model (the
  adapter disabled), the project's own settings (`COMMON_DEFAULTS`, `LORA_DEFAULTS`,
  `DPO_DEFAULTS`) with `--batch` and `--max-length` on top, then the variant's settings.
- `rm`: `trl.RewardTrainer` on `AutoModelForSequenceClassification` (`num_labels=1`), LoRA with
  the `score` head trained in full, as `tuneloop.train.reward_job` builds it.
- `lean`: the same DPO objective on the same batches, written by hand: the backbone, the LM
  head and log-softmax on the completion tokens only, a no-grad reference pass with the adapter
  disabled, AdamW on the LoRA weights. The speed a DPO step could have with these settings.
- `plain`: a forward and backward of the full model (all weights trained, the HF loss) over
  random tokens, `2 x batch` rows of `max_length`: the "plain forward+backward" yardstick.

FLOP model (useful work only: pad tokens, prompt positions of the LM head and recomputation are
left out, so a variant that skips wasted work scores higher, not lower). For one sequence of `s`
real tokens of which `c` are scored by the head (DPO: the completion tokens; reward model: 1):

    forward   = 2*s*(P_lin + P_lora) + 2*L*s^2*d + 2*c*P_head
    backward  = 2*s*(P_lin + P_lora) + 4*L*s^2*d + 2*c*P_head     (activation gradients)
              + 2*s*P_lora                                       (LoRA weight gradients)
              [+ 2*s*P_lin + 2*c*P_head when the base weights train too: `plain`]

`P_lin` is the weights of the decoder layers' projections (106 M for SmolLM2-135M), `P_head` the
output projection (vocab x hidden = 28 M, tied to the embeddings, which cost nothing), `P_lora` the
LoRA A and B matrices, `L` layers, `d` = heads x head_dim; `2*L*s^2*d` is causal attention (the
QK^T and PV products over the lower triangle). With a frozen base, autograd computes no weight
gradients for it, so the backward is one forward's worth of matmuls, not two: the textbook
`6*N*T` holds only for `plain`. A DPO step is the policy's forward and backward over the chosen
and rejected rows, plus the reference forward (without LoRA) unless `precompute_ref_log_probs`
moved it before training (then the precompute's seconds are printed as `init_s`).

GFLOP/s = useful FLOP per step / seconds per step; "% peak" divides by the fp32 matmul peak
measured in the same process (with bf16 autocast the bf16 peak is also shown).

Variants: `--variant NAME [KEY=VALUE ...]`, repeated; the first is the baseline of the ratios.
Keys:

- `omp=PASSIVE|ACTIVE|unset`: OMP_WAIT_POLICY for the process (default PASSIVE, what the
  `tuneloop` command sets for job processes);
- `threads=N`: `torch.set_num_threads` (default: one per core);
- `attn=sdpa|eager`: the model's attention implementation;
- `head=compact|trl|tiled|compact-tiled` (DPO; default `compact`, what the jobs run since
  `tuneloop.train.trl_cpu_head`): `trl`: TRL's fused LM head as shipped (on a CPU it scores
  every position, prompt and padding included, in 4096 x 32768 fp32 tiles); `tiled`: the same
  code with 256 x 4096 tiles (`trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE` and
  `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE` patched); `compact`: only the completion
  positions scored (`tuneloop.train.trl_cpu_head`: TRL's own switch, `_use_triton` as
  `trl.trainer.utils` reads it, answers True for CPU tensors; the tile math stays in torch);
- `group=true`: batches of similar lengths: a "length" column (characters of the prompt and the
  longer answer) added to the dataset, `train_sampling_strategy="group_by_length"` and
  `remove_unused_columns=False` (else the trainer drops the column before the sampler reads it).
  The sampler puts the longest batch first and then goes down in length, so with few steps the
  timed steps are not the same batches as other variants': compare GFLOP/s, or use `--epoch`.
  It sorts only within "megabatches" of `batch x min(rows // (4 x batch), 50)` rows, so on a few
  dozen pairs it barely changes the padding (32 pairs: 8-row megabatches);
- `lora.FIELD=VALUE`: the LoRA config; `lora.target_modules=q_proj+v_proj` (or `all`, `attn`);
- any other key: a field of the job's TRL config (`DPOConfig` / `RewardConfig`), the value read
  as JSON where it parses, e.g. `bf16=true`, `precompute_ref_log_probs=true`,
  `activation_checkpointing=true`, `max_length=192`. Keys the job's config lacks are ignored for
  that job (listed in the output).

Rounds (`--repeats`) run every variant once per round, in order, so that each variant's runs are
spread over the run and the machine's noise hits all of them; printed: per-step seconds of every
run, then per variant the median step, tokens, GFLOP/step, GFLOP/s, % of peak, the median of
the per-round ratios of step time to the baseline's, and `total`: the trainer's set-up
(tokenizing, and precomputing the reference log-probs where asked) plus every step, warm-up
included. With `--epoch` each run is one pass over the rows the trainer kept (`--steps` is then
ignored), so `total` is the time one epoch of training costs, the fair comparison between
variants that change batch order (`group`) or move work before training (`precompute`).

    python bench/train_speed.py [--model smollm2] [--jobs dpo rm lean plain] [--batch 4]
        [--max-length 256] [--steps 2 | --epoch] [--warmup 1] [--repeats 2] [--pairs 64]
        [--variant NAME [KEY=VALUE ...]] ... [--profile DIR] [--json FILE]

`--profile DIR` runs one extra DPO step of the first variant under `torch.profiler` and writes
the table of the costliest ops to `DIR/profile_dpo.txt` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAIRS_FILE = ROOT.parent / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"
DEFAULT_MODEL = "smollm2"  # any `--model` tuneloop takes: resolved through its model cache
JOBS = ("dpo", "rm", "lean", "plain")
TARGET_SETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qv": ["q_proj", "v_proj"],
}
ENV_KEYS = {"omp", "threads"}
MODEL_KEYS = {"attn", "head", "group"}
PEAK_SIZE = 2048
RESULT_PREFIX = "RESULT "


# --- Variants -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, Any]

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or "(project settings)"


def parse_variant(tokens: list[str]) -> Variant:
    """`["bf16", "bf16=true", "lora.r=16"]` -> Variant("bf16", {"bf16": True, "lora.r": 16})."""
    name, *items = tokens
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name}: expected KEY=VALUE, got {item!r}")
        settings[key] = _value(raw)
    return Variant(name, settings)


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# --- Measurements in the child process ------------------------------------------------------------


def matmul_peak(dtype_name: str, size: int = PEAK_SIZE, tries: int = 5) -> float:
    """GFLOP/s of the best of `tries` size^3 matmuls in `dtype_name` (after one warm-up)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


@dataclass
class Shape:
    """The sizes the FLOP model needs, from the model config and the LoRA adapter."""

    layers: int
    p_lin: int  # projection weights of all decoder layers
    p_head: int  # output projection (LM head or score head)
    attn_width: int  # heads x head_dim
    p_lora: int = 0  # LoRA A and B weights

    @classmethod
    def of(cls, config: Any, head_rows: int) -> Shape:
        h, inter = config.hidden_size, config.intermediate_size
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or h // heads
        per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
        return cls(
            config.num_hidden_layers,
            per_layer * config.num_hidden_layers,
            head_rows * h,
            heads * hd,
        )

    def forward(self, s: int, c: int, lora: bool = True) -> float:
        p = self.p_lin + (self.p_lora if lora else 0)
        return 2 * s * p + 2 * self.layers * s * s * self.attn_width + 2 * c * self.p_head

    def backward(self, s: int, c: int, full: bool = False) -> float:
        act = (
            2 * s * (self.p_lin + self.p_lora)
            + 4 * self.layers * s * s * self.attn_width
            + 2 * c * self.p_head
        )
        weights = 2 * s * self.p_lora + (2 * s * self.p_lin + 2 * c * self.p_head if full else 0)
        return act + weights


@dataclass
class BatchStats:
    padded: int
    real: int
    scored: int
    flop: float


@dataclass
class StepRecorder:
    """Wraps a collator (records each batch's tokens) and times steps from trainer callbacks."""

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    stats: Callable[[dict[str, Any]], BatchStats]
    batches: list[BatchStats] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)
    train_begin: float = 0.0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        self.batches.append(self.stats(batch))
        return batch

    def step_seconds(self) -> list[float]:
        ends = [self.train_begin, *self.step_ends]
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def timing_callback(recorder: StepRecorder) -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.train_begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.step_ends.append(time.perf_counter())

    return Timer()


def preference_rows(pairs: int) -> list[dict[str, Any]]:
    """The first `pairs` usable HH-RLHF pairs, parsed as the project's importer parses them, in
    TRL's conversational format: prompt messages, one assistant message per side."""
    from tuneloop.feedback.importer import read_preference_pairs

    if not PAIRS_FILE.exists():
        raise SystemExit(f"preference pairs not found: {PAIRS_FILE}")
    return [
        {
            "prompt": p.prompt_dicts(),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in read_preference_pairs(PAIRS_FILE, limit=pairs)
    ]


def pair_length(row: dict[str, Any]) -> int:
    """A pair's length for `group_by_length`: characters of the prompt and the longer answer."""
    prompt = sum(len(m["content"]) for m in row["prompt"])
    return prompt + max(len(row[side][0]["content"]) for side in ("chosen", "rejected"))


def apply_head_patch(mode: str) -> None:
    """Patch TRL's fused LM head (see the module docstring, key `head`)."""
    import trl.kernels.chunked_logprob as kernels
    import trl.trainer.utils as trl_utils

    if mode not in ("trl", "tiled", "compact", "compact-tiled"):
        raise SystemExit(f"unknown head mode {mode!r}")
    if mode.endswith("tiled"):
        kernels.TOKEN_CHUNK_SIZE = 256
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 4096
    if mode.startswith("compact"):
        from tuneloop.train.trl_cpu_head import score_labelled_positions_on_cpu

        score_labelled_positions_on_cpu()


def lora_settings(settings: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.train.job_config import LORA_DEFAULTS

    lora = dict(LORA_DEFAULTS)
    for key, value in settings.items():
        if key.startswith("lora."):
            if key == "lora.target_modules" and isinstance(value, str):
                value = TARGET_SETS.get(value) or value.split("+")
            lora[key.removeprefix("lora.")] = value
    return lora


def trainer_config(
    config_cls: type, job_defaults: dict[str, Any], args: dict[str, Any], out: Path
) -> tuple[Any, list[str]]:
    """The project's config for the job (as `build_config` merges it), then the variant's keys
    that the config class has; returns the config and the keys it lacks."""
    from dataclasses import fields

    from tuneloop.train.job_config import COMMON_DEFAULTS

    known = {f.name for f in fields(config_cls) if f.init}
    merged: dict[str, Any] = {
        **COMMON_DEFAULTS,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        **job_defaults,
        "per_device_train_batch_size": args["batch"],
        "max_length": args["max_length"],
        "max_steps": args["warmup"] + args["steps"] + (1 if args["profile"] else 0),
        "logging_steps": 1,
        "seed": 0,
        "data_seed": 0,
    }
    if args["settings"].get("group"):
        # Batches of similar lengths: the sampler reads the "length" column, which must survive
        # the trainer's removal of the columns its model does not take.
        merged["train_sampling_strategy"] = "group_by_length"
        merged["remove_unused_columns"] = False
    ignored = []
    for key, value in args["settings"].items():
        if key in ENV_KEYS | MODEL_KEYS or key.startswith("lora."):
            continue
        if key in known:
            merged[key] = value
        else:
            ignored.append(key)
    return config_cls(output_dir=str(out), **merged), ignored


def dpo_stats(shape: Shape, precomputed: bool) -> Callable[[dict[str, Any]], BatchStats]:
    def stats(batch: dict[str, Any]) -> BatchStats:
        real = batch["attention_mask"].sum(dim=1).tolist()
        scored = batch["completion_mask"].sum(dim=1).tolist()
        flop = 0.0
        for s, c in zip(real, scored, strict=True):
            flop += shape.forward(s, c) + shape.backward(s, c)
            if not precomputed:
                flop += shape.forward(s, c, lora=False)
        return BatchStats(batch["input_ids"].numel(), int(sum(real)), int(sum(scored)), flop)

    return stats


def rm_stats(shape: Shape) -> Callable[[dict[str, Any]], BatchStats]:
    def stats(batch: dict[str, Any]) -> BatchStats:
        real = batch["attention_mask"].sum(dim=1).tolist()
        flop = sum(shape.forward(s, 1) + shape.backward(s, 1) for s in real)
        return BatchStats(batch["input_ids"].numel(), int(sum(real)), len(real), flop)

    return stats


def load_model(kind: str, model_path: str, settings: dict[str, Any], pad_token_id: int) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {}
    if "attn" in settings:
        kwargs["attn_implementation"] = settings["attn"]
    if kind == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.pad_token_id = pad_token_id
    return model


def run_trainer_job(args: dict[str, Any], out: Path) -> dict[str, Any]:
    """Build the trainer for `args["job"]` (dpo, rm or lean), run its steps, return timings."""
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from tuneloop.train.policy_jobs import DPO_DEFAULTS
    from tuneloop.train.reward_job import DEFAULTS as RM_DEFAULTS

    settings, job = args["settings"], args["job"]
    import datasets

    datasets.disable_progress_bars()
    apply_head_patch(settings.get("head", "compact"))
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    tokenizer.padding_side = "right"
    rows = datasets.Dataset.from_list(preference_rows(args["pairs"]))
    if settings.get("group"):
        rows = rows.add_column("length", [pair_length(row) for row in rows])
    lora = lora_settings(settings)
    is_rm = job == "rm"
    model = load_model(job, args["model"], settings, tokenizer.pad_token_id)
    if is_rm:
        config, ignored = trainer_config(RewardConfig, RM_DEFAULTS, args, out)
        peft_config = LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora)
        shape = Shape.of(model.config, head_rows=1)
    else:
        config, ignored = trainer_config(DPOConfig, DPO_DEFAULTS, args, out)
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
        shape = Shape.of(model.config, head_rows=model.config.vocab_size)
    trainer_cls = RewardTrainer if is_rm else DPOTrainer
    start = time.perf_counter()
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    init_s = time.perf_counter() - start
    policy = trainer.accelerator.unwrap_model(trainer.model)
    shape.p_lora = sum(p.numel() for n, p in policy.named_parameters() if ".lora_" in n)
    # The lean step runs its own reference pass whatever the config says.
    precomputed = job == "dpo" and bool(getattr(config, "precompute_ref_log_probs", False))
    stats = rm_stats(shape) if is_rm else dpo_stats(shape, precomputed)
    recorder = StepRecorder(trainer.data_collator, stats)
    trainer.data_collator = recorder
    if args.get("epoch"):  # one pass over the rows the trainer kept, whatever --steps says
        steps = -(-len(trainer.train_dataset) // args["batch"])
        trainer.args.max_steps = steps
        args["steps"] = steps - args["warmup"]
    trainer.add_callback(timing_callback(recorder))
    result = {
        "init_s": init_s,
        "rows": len(trainer.train_dataset),
        "ignored": ignored,
        "checkpointing": bool(getattr(policy, "is_gradient_checkpointing", False)),
        "bf16": bool(config.bf16),
        "threads": _threads(),
        "p_lora": shape.p_lora,
    }
    if job == "lean":
        lean_steps(trainer, recorder, float(config.beta), args)
    elif args["profile"]:
        profile_train(trainer, recorder, args)
    else:
        trainer.train()
    history = trainer.state.log_history
    result["loss"] = [log["loss"] for log in history if "loss" in log]
    return {**result, **step_result(recorder, args)}


def step_result(recorder: StepRecorder, args: dict[str, Any]) -> dict[str, Any]:
    seconds = recorder.step_seconds()
    timed = slice(args["warmup"], args["warmup"] + args["steps"])
    batches = recorder.batches[timed]
    return {
        "warmup_s": seconds[: args["warmup"]],
        "step_s": seconds[timed],
        "padded": [b.padded for b in batches],
        "real": [b.real for b in batches],
        "scored": [b.scored for b in batches],
        "flop": [b.flop for b in batches],
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def lean_steps(trainer: Any, recorder: StepRecorder, beta: float, args: dict[str, Any]) -> None:
    """The DPO loss on the trainer's own batches, written without TRL's fused head."""
    import torch
    import torch.nn.functional as F

    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.train()
    backbone = policy.get_base_model().model
    head = policy.get_base_model().lm_head
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(trainer.args.learning_rate))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(trainer.args.bf16))

    def sequence_logps(batch: dict[str, Any]) -> torch.Tensor:
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[:, :-1]
        mask = batch["completion_mask"][:, 1:].bool()
        targets = batch["input_ids"][:, 1:][mask]
        logits = head(hidden[mask]).float()
        token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        rows = torch.arange(mask.size(0)).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(mask.size(0)).index_add(0, rows, token_logps)

    loader = iter(trainer.get_train_dataloader())
    recorder.train_begin = time.perf_counter()
    for _ in range(args["warmup"] + args["steps"]):
        batch = next(loader)
        with autocast:
            logps = sequence_logps(batch)
            with torch.no_grad(), policy.disable_adapter():
                ref = sequence_logps(batch)
        chosen, rejected = (logps - ref).chunk(2)
        loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.step_ends.append(time.perf_counter())


def profile_train(trainer: Any, recorder: StepRecorder, args: dict[str, Any]) -> None:
    """Train; the last step runs under torch.profiler, its op table written to the profile dir."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    total = args["warmup"] + args["steps"] + 1
    holder: dict[str, Any] = {}

    class Profiled(TrainerCallback):
        def on_step_begin(self, a: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == total - 1:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                holder["prof"].__enter__()

        def on_step_end(self, a: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if "prof" in holder and state.global_step == total:
                holder["prof"].__exit__(None, None, None)

    trainer.add_callback(Profiled())
    trainer.train()
    prof = holder["prof"]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40
    )
    text = f"{table}\n\nBy input shape:\n{by_shape}\n"
    path = Path(args["profile"]) / f"profile_{args['job']}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, file=sys.stderr)


def run_plain(args: dict[str, Any], out: Path) -> dict[str, Any]:
    """Full-model forward + backward (HF loss) over random tokens: 2*batch rows of max_length."""
    import torch

    model = load_model("plain", args["model"], args["settings"], pad_token_id=0)
    model.train()
    shape = Shape.of(model.config, head_rows=model.config.vocab_size)
    rows, length = 2 * args["batch"], args["max_length"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=gen)
    bf16 = bool(args["settings"].get("bf16", False))
    flop = rows * (shape.forward(length, length) + shape.backward(length, length, full=True))
    recorder = StepRecorder(lambda x: x, lambda b: BatchStats(0, 0, 0, 0.0))
    recorder.train_begin = time.perf_counter()
    for _ in range(args["warmup"] + args["steps"]):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        recorder.step_ends.append(time.perf_counter())
        recorder.batches.append(BatchStats(ids.numel(), ids.numel(), ids.numel(), flop))
    result = {"init_s": 0.0, "rows": rows, "ignored": [], "threads": _threads(), "bf16": bf16}
    return {**result, **step_result(recorder, args)}


def child_main(args: dict[str, Any]) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    if "threads" in args["settings"]:
        torch.set_num_threads(int(args["settings"]["threads"]))
    peaks_before = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        job = run_plain if args["job"] == "plain" else run_trainer_job
        result = job(args, Path(tmp))
    peaks_after = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    result["peak_fp32"] = [peaks_before["float32"], peaks_after["float32"]]
    result["peak_bf16"] = [peaks_before["bfloat16"], peaks_after["bfloat16"]]
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- The parent: rounds of child processes --------------------------------------------------------


@dataclass
class Run:
    variant: str
    job: str
    round: int
    data: dict[str, Any]

    @property
    def step_median(self) -> float:
        return statistics.median(self.data["step_s"])

    def mean(self, key: str) -> float:
        return statistics.mean(self.data[key])

    @property
    def peak(self) -> float:
        return max(self.data["peak_fp32"])

    @property
    def total(self) -> float:
        """Trainer set-up (tokenizing; precomputing reference log-probs) and every step."""
        return self.data["init_s"] + sum(self.data["warmup_s"]) + sum(self.data["step_s"])

    @property
    def gflops(self) -> float:
        return self.mean("flop") / self.step_median / 1e9


def child_env(settings: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    omp = str(settings.get("omp", "PASSIVE"))
    if omp == "unset":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = omp
    if "threads" in settings:
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(
    variant: Variant, job: str, opts: argparse.Namespace, profile: bool
) -> dict[str, Any]:
    args = {
        "job": job,
        "settings": variant.settings,
        "model": str(opts.model),
        "batch": opts.batch,
        "max_length": opts.max_length,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "pairs": opts.pairs,
        "profile": str(opts.profile) if profile else None,
        "epoch": opts.epoch,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        env=child_env(variant.settings),
        capture_output=True,
        text=True,
        timeout=opts.timeout,
    )
    if profile and proc.stderr:
        print(_profile_part(proc.stderr), flush=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"{variant.name}/{job} failed (exit {proc.returncode}):\n{tail}")


def _profile_part(stderr: str) -> str:
    start = stderr.find("-----")
    return stderr[start:] if start >= 0 else ""


def _losses(data: dict[str, Any]) -> str:
    return " ".join(f"{x:.4f}" for x in data.get("loss", [])) or "-"


def report(runs: list[Run], variants: list[Variant], jobs: list[str]) -> None:
    print("\nPer run (seconds of each timed step; peak = fp32 matmul GFLOP/s before/after):")
    for run in runs:
        d = run.data
        steps = " ".join(f"{s:.2f}" for s in d["step_s"])
        peaks = "/".join(f"{p:.0f}" for p in d["peak_fp32"])
        print(
            f"  r{run.round} {run.job:5} {run.variant:16} steps [{steps}] s  warm-up "
            f"{' '.join(f'{s:.1f}' for s in d['warmup_s'])} s  init {d['init_s']:.1f} s  "
            f"total {run.total:.1f} s  peak {peaks}  threads {d['threads']}  loss {_losses(d)}"
        )
    header = (
        f"{'job':5} {'variant':16} {'step s':>7} {'min s':>6} {'padded':>6} {'real':>5} "
        f"{'scored':>6} {'GFLOP':>6} {'GFLOP/s':>7} {'peak32':>6} {'%peak':>5} {'peak16':>6} "
        f"{'x base':>6} {'total':>6}"
    )
    print("\nMedians over runs (tokens per step; GFLOP = useful FLOP per step, see the docstring):")
    print(header)
    for job in jobs:
        base_by_round = {
            r.round: r.step_median for r in runs if r.job == job and r.variant == variants[0].name
        }
        for variant in variants:
            mine = [r for r in runs if r.job == job and r.variant == variant.name]
            if not mine:
                continue
            step = statistics.median(s for r in mine for s in r.data["step_s"])
            fastest = min(s for r in mine for s in r.data["step_s"])
            flop = statistics.mean(f for r in mine for f in r.data["flop"])
            peak32 = statistics.median(r.peak for r in mine)
            peak16 = statistics.median(max(r.data["peak_bf16"]) for r in mine)
            ratios = [
                r.step_median / base_by_round[r.round] for r in mine if r.round in base_by_round
            ]
            ratio = f"{statistics.median(ratios):6.2f}" if ratios else "     -"
            gflops = flop / step / 1e9
            print(
                f"{job:5} {variant.name:16} {step:7.2f} {fastest:6.2f} "
                f"{statistics.mean(p for r in mine for p in r.data['padded']):6.0f} "
                f"{statistics.mean(p for r in mine for p in r.data['real']):5.0f} "
                f"{statistics.mean(p for r in mine for p in r.data['scored']):6.0f} "
                f"{flop / 1e9:6.0f} {gflops:7.1f} {peak32:6.0f} {100 * gflops / peak32:5.1f} "
                f"{peak16:6.0f} {ratio} {statistics.median(r.total for r in mine):6.1f}"
            )
    ignored = {
        (v.name, k)
        for r in runs
        for v in variants
        if v.name == r.variant
        for k in r.data.get("ignored", [])
    }
    for name, key in sorted(ignored):
        print(f"  note: {name}: {key} is not a field of the reward config; ignored for rm")
    print("x base: median over rounds of (step s / the first variant's step s in that round).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=["dpo", "rm"])
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument(
        "--epoch", action="store_true", help="run one epoch over the kept rows (not --steps)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all variants")
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs to load")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="NAME [KEY=VALUE",
        help="a named variant and its settings (repeatable; the first is the baseline)",
    )
    parser.add_argument("--profile", type=Path, help="profile one extra DPO step into DIR")
    parser.add_argument("--json", type=Path, help="write every run's data here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child_main(json.loads(opts.child))
        return 0
    from tuneloop.models import resolve_model

    opts.model = resolve_model(opts.model)
    variants = [parse_variant(v) for v in (opts.variant or [["project"]])]
    if len({v.name for v in variants}) != len(variants):
        parser.error("variant names must differ")
    print(
        f"model {opts.model}; batch {opts.batch} pairs; max_length {opts.max_length}; "
        f"{opts.warmup} warm-up + {opts.steps} timed steps per run; {opts.repeats} rounds; "
        f"{os.cpu_count()} CPUs"
    )
    for v in variants:
        print(f"  {v.name}: {v.describe()}")
    runs: list[Run] = []
    for rnd in range(opts.repeats):
        for job in opts.jobs:
            for i, variant in enumerate(variants):
                profile = bool(opts.profile) and rnd == 0 and i == 0 and job == "dpo"
                data = run_child(variant, job, opts, profile)
                run = Run(variant.name, job, rnd, data)
                runs.append(run)
                print(
                    f"r{rnd} {job:5} {variant.name:16} step {run.step_median:6.2f} s  "
                    f"{run.gflops:6.1f} GFLOP/s  peak {run.peak:4.0f}",
                    flush=True,
                )
    report(runs, variants, opts.jobs)
    if opts.json:
        opts.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
