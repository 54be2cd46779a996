"""Sampling a policy's answers for evaluation, and its KL to another policy on them.

Both are what the promotion gate needs (`tuneloop.train.gate`): answers sampled the way the server
samples (temperature and top-p only, nothing from the model's own generation config), reproducible
for a given seed, and the divergence between two policies measured on the first one's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SampledAnswers:
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]  # up to and including the end-of-turn token, when reached
    texts: list[str]


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
) -> SampledAnswers:
    """Batched `generate` over left-padded prompts; batch k is seeded with seed + k, so a policy
    given the same prompts and settings samples the same answers."""
    import torch
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    # generate() fills unset options from the model's generation config (top_k, repetition
    # penalty, ...): replace it, so both policies sample with exactly these settings, as served.
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    # top_k=0 turns top-k off: an option left unset takes transformers' global default (top-k
    # 50), which the server never applies; sampling the tail or not changes what a small model
    # says (on the demo model, a quarter fewer words with top-k 50).
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    options = {"max_new_tokens": max_tokens, **(sampling if temperature > 0 else {})}
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    room = max(1, model.config.max_position_embeddings - max_tokens)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    prompt_ids = [ids[-room:] for ids in encoded]  # too long: keep the end, nearest the answer
    answers: list[list[int]] = []
    for k, start in enumerate(range(0, len(prompt_ids), batch_size)):
        input_ids, mask = _left_pad(prompt_ids[start : start + batch_size], pad)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed + k)
            out = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                **options,
            )
        for row in out[:, input_ids.shape[1] :].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(row[:end])
    decoded = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return SampledAnswers(prompt_ids, answers, decoded)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def mean_token_kl(policy: Any, parent: Any, sampled: SampledAnswers, batch_size: int) -> float:
    """Exact KL(policy || parent) of the next-token distributions at each answer position,
    averaged over all answer tokens. Sequences are left-padded with explicit positions, so every
    answer ends at the right edge and only its logits are computed (`logits_to_keep`)."""
    import torch

    total, tokens = 0.0, 0
    for start in range(0, len(sampled.answer_ids), batch_size):
        answers = sampled.answer_ids[start : start + batch_size]
        prompts = sampled.prompt_ids[start : start + batch_size]
        width = max(len(a) for a in answers)
        if width == 0:
            continue
        # The pad id is irrelevant: padding is masked out and its logits are never read.
        ids, mask = _left_pad([p + a for p, a in zip(prompts, answers, strict=True)], 0)
        with torch.inference_mode():
            logp = _answer_logprobs(policy, ids, mask, width)
            logq = _answer_logprobs(parent, ids, mask, width)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # [batch, width]
        for row, answer in enumerate(answers):
            if answer:
                total += kl[row, width - len(answer) :].sum().item()
                tokens += len(answer)
    return total / tokens if tokens else 0.0


def _answer_logprobs(model: Any, ids: Any, mask: Any, width: int) -> Any:
    """Next-token log-probs at the last `width` positions that predict a token of the sequence
    (the logits of the very last position, which predict past the end, are dropped)."""
    import torch

    out = model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(model.device),
        logits_to_keep=width + 1,
    )
    return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
