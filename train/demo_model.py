"""The offline demo model: a toy Llama chat model trained from scratch on this machine's CPU.

`tuneloop up` needs a chat model and can download nothing, so it trains one, once, in a fixed time
budget (150 s by default), on ChatML dialogues made from the Python installation's own
documentation (PSF License, see `tuneloop.train.tiny_model`): the user asks about a topic ("What
is <subject>?", "Explain <subject>.", ...) and the assistant answers with the first sentences of
the matching pydoc section or docstring. The loss covers only the assistant's tokens.

The result is a toy: after the default budget it writes English words in roughly the style of the
Python docs, without meaning. It exists so that the chat, feedback and retraining loop has a model
to run on; a real deployment points tuneloop at a real model.

The build lands in a temporary sibling directory and is renamed into place when complete, with a
`tuneloop-demo.json` marker; a directory holding a marker for the same recipe is reused as is.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.train.thread_count import ThreadCountChooser
from tuneloop.train.tiny_model import (
    IM_END,
    IM_START,
    PAD,
    LocalDocument,
    local_documents,
    new_llama,
    train_tokenizer,
)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when anything changes what a build produces: cached builds of older recipes are rebuilt.
RECIPE_VERSION = 2
MARKER_FILE = "tuneloop-demo.json"

_QUESTIONS = (
    "What is {}?",
    "Tell me about {}.",
    "Explain {}.",
    "What does {} do?",
    "Can you describe {}?",
    "What should I know about {}?",
)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# Time kept back from the training loop for saving the model.
_SAVE_RESERVE_S = 1.0


@dataclass(frozen=True)
class DemoRecipe:
    """Model shape and training settings; the defaults are tuned for 150 s on 2 CPU cores.

    At equal compute a small model wins here: for one CPU budget (560, 393 and 267 steps of 4096
    tokens), hidden 96 reached an answer loss of 3.8, hidden 128 4.3 and hidden 192 5.0 (4 layers
    each). The corpus (~280k tokens of dialogue) is then seen about eight times.
    """

    hidden_size: int = 96
    num_layers: int = 4
    intermediate_size: int = 256
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 20
    # More than this machine holds (~1.1M characters): all of it.
    corpus_chars: int = 2_000_000
    answer_chars: int = 400


DEFAULT_RECIPE = DemoRecipe()


def build_demo_model(
    out_dir: Path,
    *,
    seconds: float = 150.0,
    progress: bool = True,
    seed: int = 0,
    recipe: DemoRecipe = DEFAULT_RECIPE,
) -> Path:
    """Train the demo model into `out_dir` within about `seconds` of wall time, or reuse it.

    If `out_dir` already holds a finished build of the same `RECIPE_VERSION` and `recipe`, it is
    returned at once (whatever `seconds` and `seed` say). The time budget covers everything:
    reading the corpus, training the tokenizer, the training loop and saving.
    """
    out_dir = Path(out_dir)
    if read_marker(out_dir, recipe) is not None:
        return out_dir
    started = time.monotonic()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
    try:
        _build(tmp, started + seconds, progress=progress, seed=seed, recipe=recipe)
        _move_into_place(tmp, out_dir, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_marker(out_dir: Path, recipe: DemoRecipe = DEFAULT_RECIPE) -> dict[str, Any] | None:
    """The marker of a finished build of this recipe in `out_dir`, or None."""
    try:
        marker = json.loads((Path(out_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    current = marker.get("recipe_version") == RECIPE_VERSION and marker.get("recipe") == asdict(
        recipe
    )
    return marker if current else None


def _build(
    out_dir: Path, deadline: float, *, progress: bool, seed: int, recipe: DemoRecipe
) -> None:
    import torch

    started = time.monotonic()
    docs = local_documents(recipe.corpus_chars)
    dialogues = _dialogues(docs, random.Random(seed), recipe.answer_chars)
    tokenizer = train_tokenizer(_tokenizer_texts(dialogues), recipe.vocab_size)
    inputs, labels = _pack(tokenizer, dialogues, recipe.seq_len)
    model = new_llama(
        tokenizer,
        seed=seed,
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=2 * recipe.seq_len,
    )
    tokenizer.model_max_length = model.config.max_position_embeddings
    cores = len(os.sched_getaffinity(0))
    picker = ThreadCountChooser(cores, start=cores)  # a build usually has the machine to itself
    threads = torch.get_num_threads()
    try:
        steps, loss = _train(
            model,
            inputs,
            labels,
            recipe,
            deadline - _SAVE_RESERVE_S,
            picker,
            seed=seed,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    _save(model, tokenizer, out_dir)
    marker = {
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "steps": steps,
        "steps_by_threads": picker.steps_by_threads,
        "final_loss": round(loss, 4),
        "parameters": model.num_parameters(),
        "dialogues": len(dialogues),
        "train_tokens": int(inputs.numel()),
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def demo_questions(n: int, seed: int = 0, recipe: DemoRecipe = DEFAULT_RECIPE) -> list[str]:
    """Up to `n` questions like those the demo model learned to answer, about subjects found on
    this machine (what `tuneloop simulate`'s users ask)."""
    rng = random.Random(seed)
    subjects = sorted({doc.subject for doc in local_documents(recipe.corpus_chars)})
    rng.shuffle(subjects)
    return [rng.choice(_QUESTIONS).format(subject) for subject in subjects[:n]]


def _dialogues(
    docs: list[LocalDocument], rng: random.Random, answer_chars: int
) -> list[tuple[str, str]]:
    """(question, answer) pairs: a question about each document's subject, its first sentences."""
    pairs = []
    for doc in docs:
        question = rng.choice(_QUESTIONS).format(doc.subject)
        pairs.append((question, _first_sentences(doc.text, answer_chars)))
    rng.shuffle(pairs)
    return pairs


def _first_sentences(text: str, max_chars: int) -> str:
    """Whole sentences from the start of `text`, at least one, up to about `max_chars`."""
    answer = ""
    for sentence in _SENTENCE_BREAK.split(" ".join(text.split())):
        if answer and len(answer) + len(sentence) >= max_chars:
            break
        answer = f"{answer} {sentence}" if answer else sentence
    return answer


def _tokenizer_texts(dialogues: list[tuple[str, str]]) -> Iterator[str]:
    for question, answer in dialogues:
        yield question
        yield answer


def _pack(
    tokenizer: PreTrainedTokenizerFast, dialogues: list[tuple[str, str]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the ChatML-rendered dialogues and cut them into rows of `seq_len` tokens.

    Labels are -100 on each prompt (through `<|im_start|>assistant\\n`), so the loss covers the
    assistant's answer and its `<|im_end|>` only.
    """
    import torch

    prompts, answers = [], []
    for question, answer in dialogues:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        prompts.append(prompt)
        answers.append(full[len(prompt) :])
    ids: list[int] = []
    labels: list[int] = []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        ids += p + a
        labels += [-100] * len(p) + a
    rows = len(ids) // seq_len
    shape = (rows, seq_len)
    return (
        torch.tensor(ids[: rows * seq_len]).view(shape),
        torch.tensor(labels[: rows * seq_len]).view(shape),
    )


def _train(
    model: LlamaForCausalLM,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    recipe: DemoRecipe,
    deadline: float,
    picker: ThreadCountChooser,
    *,
    seed: int,
    progress: bool,
) -> tuple[int, float]:
    """AdamW until `deadline`, the learning rate following a cosine over the time budget.

    Each step runs on the thread count `picker` chooses. Stops before a step that would overrun
    the deadline. Returns the steps taken and the mean loss of the last ten.
    """
    import torch
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    budget = max(deadline - start, 1e-3)
    losses: list[float] = []
    step_time = 0.0
    model.train()
    with tqdm(total=round(budget), unit="s", desc="demo model", disable=not progress) as bar:
        for rows in _batches(len(inputs), recipe.batch_size, generator):
            now = time.monotonic()
            if now + step_time > deadline:
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr(recipe, len(losses), (now - start) / budget)
            threads = picker.next_threads()
            torch.set_num_threads(threads)
            loss = model(input_ids=inputs[rows], labels=labels[rows]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step_time = time.monotonic() - now
            picker.record(threads, step_time)
            bar.n = min(round(time.monotonic() - start), bar.total)
            bar.set_postfix(step=len(losses), loss=f"{losses[-1]:.3f}", threads=threads)
    model.eval()
    tail = losses[-10:]
    return len(losses), (sum(tail) / len(tail) if tail else math.nan)


def _batches(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices, batch by batch, reshuffled every epoch, forever."""
    import torch

    while True:
        order = torch.randperm(n_rows, generator=generator)
        for i in range(0, n_rows - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
        if n_rows < batch_size:
            yield order


def _lr(recipe: DemoRecipe, step: int, time_fraction: float) -> float:
    warmup = min(1.0, (step + 1) / recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(time_fraction, 1.0)))
    return recipe.lr * warmup * (0.1 + 0.9 * cosine)


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        do_sample=True,
        temperature=0.7,
        max_new_tokens=128,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _move_into_place(tmp: Path, out_dir: Path, recipe: DemoRecipe) -> None:
    """Rename the finished build to `out_dir`, replacing a stale build but nothing else."""
    if read_marker(out_dir, recipe) is not None:
        return  # another process finished the same build meanwhile: keep theirs
    _check_replaceable(out_dir)
    if (out_dir / MARKER_FILE).exists():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.rmdir()
    try:
        tmp.rename(out_dir)
    except OSError:
        if read_marker(out_dir, recipe) is None:
            raise


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite anything but a demo build (of any recipe) or an empty directory."""
    if not out_dir.exists() or (out_dir / MARKER_FILE).exists():
        return
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a tuneloop demo model")
