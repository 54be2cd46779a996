"""Scoring answers with a reward model, and its pairwise accuracy on preference pairs.

A reward-model version directory holds full weights of an `AutoModelForSequenceClassification`
with one label, and its tokenizer. Inputs are formatted the way TRL's RewardTrainer formats
conversational pairs: the chat template applied to the prompt messages plus the answer as one
assistant message, tokenized as a whole (no generation prompt, no extra special tokens).

Padding is on the right: positions then start at 0 as in training (TRL pads right too), and the
model reads its score at the last non-pad token whichever side is padded.

Too-long conversations keep their END (the last `max_length` tokens, `max_length` being the model's
position limit): the score is read at the last token and is about the answer, so the answer and
the turns nearest to it are what must stay. (TRL's RewardTrainer drops over-long pairs rather than
truncating them, so a truncated input is outside what the model was trained on either way.)

    python -m tuneloop.train.scoring --reward-model DIR --data FILE [--json]

prints the accuracy of the reward model on a preference file (any format the importer reads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.feedback.importer import PreferencePair

# tokenizer.model_max_length is a huge sentinel when the tokenizer sets no limit.
_NO_LIMIT = 1_000_000


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class RewardScorer:
    """A loaded reward model: `score(prompts, completions)` gives one float per answer."""

    def __init__(
        self, model_dir: str | Path, *, device: str | None = None, batch_size: int = 16
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or default_device()
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {model_dir} has no chat template")
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
        if model.config.num_labels != 1:
            raise ValueError(f"{model_dir} has {model.config.num_labels} labels; a reward has 1")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = (
                self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id
            )
        self.pad_token_id: int = model.config.pad_token_id
        self.model = model.to(self.device).eval()
        limits = [getattr(model.config, "max_position_embeddings", None)]
        limits.append(self.tokenizer.model_max_length)
        self.max_length = min(n for n in limits if n and n < _NO_LIMIT)

    def encode(self, prompts: list[list[dict]], completions: list[str]) -> list[list[int]]:
        """Token ids of each prompt + answer conversation, keeping the last `max_length`."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if prompts and not isinstance(prompts[0], list):
            raise TypeError("prompts must be a list of message lists, one per completion")
        texts = self.tokenizer.apply_chat_template(
            [
                [*prompt, {"role": "assistant", "content": completion}]
                for prompt, completion in zip(prompts, completions, strict=True)
            ],
            tokenize=False,
        )
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [x[-self.max_length :] for x in ids]

    def score(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        """The reward of each completion as the assistant's answer to its prompt."""
        return self.score_ids(self.encode(prompts, completions)) if prompts else []

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """Rewards of tokenized conversations, in batches of similar lengths."""
        import torch

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores = [0.0] * len(ids)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = len(ids[chunk[0]])
                input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
                for i, value in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                    scores[i] = value
        return scores


def pairwise_accuracy(scorer: RewardScorer, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """How often the chosen answer scores above the rejected one (ties count half), and the mean
    score margin (chosen minus rejected)."""
    if not pairs:
        raise ValueError("no preference pairs to score")
    prompts = [p.prompt_dicts() for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs])
    rejected = scorer.score(prompts, [p.rejected for p in pairs])
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    wins = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs)
    margin = sum(diffs) / len(pairs)
    return {"accuracy": wins / len(pairs), "margin": margin, "pairs": len(pairs)}


def evaluate_file(
    reward_model_dir: str | Path,
    data: str | Path,
    *,
    limit: int | None = None,
    device: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """`pairwise_accuracy` of a reward model on a preference file (any format the importer
    reads). Raises ImportFormatError for a malformed file, ValueError for one without pairs."""
    from tuneloop.feedback.importer import read_preference_pairs

    pairs = read_preference_pairs(data, limit=limit)
    if not pairs:
        raise ValueError(f"no usable preference pairs in {data}")
    scorer = RewardScorer(reward_model_dir, device=device, batch_size=batch_size)
    return pairwise_accuracy(scorer, pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuneloop.train.scoring",
        description="Pairwise accuracy of a reward model on a preference file.",
    )
    parser.add_argument("--reward-model", required=True, type=Path, help="reward version dir")
    parser.add_argument(
        "--data", required=True, type=Path, help=".jsonl[.gz], .json or .parquet pairs"
    )
    parser.add_argument("--limit", type=int, default=None, help="score the first N pairs only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:
        result = evaluate_file(
            args.reward_model,
            args.data,
            limit=args.limit,
            device=args.device,
            batch_size=args.batch_size,
        )
    except (ValueError, OSError) as exc:  # ImportFormatError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy {result['accuracy']:.3f} (mean margin {result['margin']:.3f}) "
            f"over {result['pairs']} pairs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
