"""The offline model builders: tokenizer, tiny random models, and the cached demo model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
)

from tuneloop.train import demo_model
from tuneloop.train.demo_model import MARKER_FILE, RECIPE_VERSION, DemoRecipe, build_demo_model
from tuneloop.train.tiny_model import (
    HEAD_DIM,
    IM_END,
    IM_START,
    PAD,
    local_corpus,
    train_tokenizer,
)

QUESTION = [{"role": "user", "content": "What is a list?"}]
# A demo recipe small enough to train for a few seconds in a test.
SMALL_RECIPE = DemoRecipe(
    hidden_size=32,
    num_layers=1,
    intermediate_size=64,
    vocab_size=512,
    seq_len=64,
    batch_size=8,
    corpus_chars=60_000,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(local_corpus(60_000), vocab_size=512)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(
        tmp_path_factory.mktemp("demo") / "model", seconds=6, progress=False, recipe=SMALL_RECIPE
    )


def load(model_dir: Path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return tok, model


def new_tokens(tok, model, messages=QUESTION, **kwargs) -> list[int]:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**enc, **kwargs)
    return out[0, enc["input_ids"].shape[1] :].tolist()


class ForceAt(LogitsProcessor):
    """Makes `token_id` the only choice once `after` tokens have been generated."""

    def __init__(self, prompt_len: int, after: int, token_id: int) -> None:
        self.at, self.token_id = prompt_len + after, token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -math.inf)
            scores[:, self.token_id] = 0.0
        return scores


# --- Corpus and tokenizer -------------------------------------------------------------------------


def test_local_corpus_is_prose_of_the_requested_size() -> None:
    texts = local_corpus(100_000)
    assert 100_000 <= sum(map(len, texts)) < 150_000
    assert len(set(texts)) == len(texts)
    assert not any(">>>" in t or "::=" in t for t in texts)
    assert local_corpus(100_000) == texts  # deterministic


def test_tokenizer_round_trips_text(tokenizer) -> None:
    text = "A list is a mutable sequence.\n\n  Indented line\twith tab, ümlauts & emoji 🎉!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [IM_START, IM_END, PAD]
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == (IM_START, IM_END, PAD)


def test_chat_template_renders_chatml(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n"
    chat = [*QUESTION, {"role": "assistant", "content": "A sequence."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nWhat is a list?<|im_end|>\n"
        "<|im_start|>assistant\nA sequence.<|im_end|>\n"
    )
    enc = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    assert enc["input_ids"].count(tokenizer.convert_tokens_to_ids(IM_START)) == 2
    answer = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(answer) == "A sequence.<|im_end|>"


# --- Tiny random models ---------------------------------------------------------------------------


def test_tiny_model_loads_and_generates(tiny_model_dir: Path) -> None:
    tok, model = load(tiny_model_dir)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert model.config.tie_word_embeddings
    # Heads of 32, the smallest vLLM's CPU attention takes (hidden 64: 2 heads).
    assert model.config.head_dim == HEAD_DIM == 32
    assert model.config.num_attention_heads * HEAD_DIM == model.config.hidden_size
    assert model.config.eos_token_id == model.generation_config.eos_token_id == im_end
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id
    assert (tiny_model_dir / "model.safetensors").is_file()
    tokens = new_tokens(tok, model)
    assert 0 < len(tokens) <= model.generation_config.max_new_tokens


def test_generation_stops_at_im_end(tiny_model_dir: Path) -> None:
    tok, model = load(tiny_model_dir)
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    force = ForceAt(enc["input_ids"].shape[1], 3, tok.convert_tokens_to_ids(IM_END))
    out = model.generate(**enc, logits_processor=LogitsProcessorList([force]))
    tokens = out[0, enc["input_ids"].shape[1] :].tolist()
    assert len(tokens) == 4  # no eos_token_id passed: the saved generation config stops it
    assert tokens[-1] == tok.convert_tokens_to_ids(IM_END)


def test_seeds_give_different_models(tiny_model_dir: Path, tiny_model_dir_b: Path) -> None:
    tok_a, model_a = load(tiny_model_dir)
    tok_b, model_b = load(tiny_model_dir_b)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    weights_a = model_a.get_input_embeddings().weight
    assert not torch.equal(weights_a, model_b.get_input_embeddings().weight)
    prompts = [[{"role": "user", "content": q}] for q in ("What is a list?", "Hello!", "Why?")]
    answers_a = [new_tokens(tok_a, model_a, p) for p in prompts]
    assert answers_a != [new_tokens(tok_b, model_b, p) for p in prompts]
    assert answers_a == [new_tokens(tok_a, model_a, p) for p in prompts]  # greedy: repeatable


# --- Demo model -----------------------------------------------------------------------------------


def test_demo_build_is_complete_and_chats(demo_dir: Path) -> None:
    marker = json.loads((demo_dir / MARKER_FILE).read_text())
    assert marker["recipe_version"] == RECIPE_VERSION
    assert marker["steps"] > 0
    assert marker["final_loss"] < math.log(SMALL_RECIPE.vocab_size)  # it learned something
    assert marker["seconds"] < 15
    assert not [p for p in demo_dir.parent.iterdir() if p != demo_dir]  # no temp dir left
    tok, model = load(demo_dir)
    assert model.num_parameters() == marker["parameters"]
    gen = model.generation_config
    assert (gen.do_sample, gen.temperature, gen.max_new_tokens) == (True, 0.7, 128)
    assert gen.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    torch.manual_seed(0)
    tokens = new_tokens(tok, model, max_new_tokens=16)
    assert 0 < len(tokens) <= 16


def test_demo_build_is_cached(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = demo_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached demo model")

    monkeypatch.setattr(demo_model, "_build", no_training)
    start = time.monotonic()
    assert build_demo_model(demo_dir, seconds=3, progress=False, recipe=SMALL_RECIPE) == demo_dir
    assert time.monotonic() - start < 0.5
    assert weights.stat().st_mtime_ns == mtime


def test_failed_demo_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(demo_model, "_train", crash)
    with pytest.raises(RuntimeError, match="mid-training"):
        build_demo_model(tmp_path / "model", seconds=3, progress=False, recipe=SMALL_RECIPE)
    assert list(tmp_path.iterdir()) == []


def test_demo_build_refuses_to_replace_foreign_dir(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_demo_model(tmp_path / "model", seconds=1, progress=False, recipe=SMALL_RECIPE)
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
