"""The embedded engine: concurrent streams never corrupt each other, and a swap is atomic."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tuneloop.core.records import Message, SamplingParams
from tuneloop.serve.engine import EmbeddedEngine, PromptTooLongError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [[Message("user", f"Question number {i}: what is a dict?")] for i in range(6)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> EmbeddedEngine:
    return EmbeddedEngine(tiny_model_dir, "v-a", max_concurrency=8)


def answer(engine: EmbeddedEngine, messages: list[Message]) -> tuple[str, str, int]:
    gen = engine.stream(messages, GREEDY)
    text = "".join(gen)
    return gen.version_id, text, gen.completion_tokens


def test_streams_report_tokens_and_finish_reason(engine: EmbeddedEngine) -> None:
    gen = engine.stream(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0))
    chunks = list(gen)
    assert gen.prompt_tokens > 5
    assert 1 <= gen.completion_tokens <= 5
    assert gen.finish_reason == ("length" if gen.completion_tokens == 5 else "stop")
    assert "".join(chunks)


def test_concurrent_streams_match_sequential_ones(engine: EmbeddedEngine) -> None:
    sequential = [answer(engine, p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: answer(engine, p), PROMPTS))
    assert concurrent == sequential


@pytest.mark.parametrize("merge_s", [0.0, 0.2])
def test_async_streams_give_the_same_text_and_merge_chunks(
    engine: EmbeddedEngine, merge_s: float
) -> None:
    async def run() -> list[tuple[str, list[str]]]:
        async def one(messages: list[Message]) -> tuple[str, list[str]]:
            gen = engine.stream(messages, GREEDY)
            return gen.version_id, [c async for c in gen.achunks(merge_s)]

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    unmerged = [list(engine.stream(p, GREEDY)) for p in PROMPTS]
    streamed = asyncio.run(run())
    assert [(v, "".join(c)) for v, c in streamed] == [("v-a", "".join(c)) for c in unmerged]
    chunks, unmerged_chunks = sum(len(c) for _, c in streamed), sum(len(c) for c in unmerged)
    if merge_s:  # tokens decoded while a chunk was held back for 0.2 s go out with the next one
        assert chunks < unmerged_chunks
    else:
        assert chunks <= unmerged_chunks


def test_prompt_too_long_is_a_clear_error(engine: EmbeddedEngine) -> None:
    with pytest.raises(PromptTooLongError, match="reads at most"):
        engine.stream([Message("user", "word " * 10_000)], GREEDY)


def test_swap_is_atomic_under_concurrent_streams(
    tiny_model_dir: Path, tiny_model_dir_b: Path
) -> None:
    eng = EmbeddedEngine(tiny_model_dir, "v-a")
    prompt = PROMPTS[1]
    ref_a = answer(eng, prompt)[1]
    eng_b = EmbeddedEngine(tiny_model_dir_b, "v-b")
    ref_b = answer(eng_b, prompt)[1]
    assert ref_a != ref_b, "the two test models must answer differently"

    # Streams that have started (first chunk read) before the swap...
    before = [eng.stream(prompt, GREEDY) for _ in range(4)]
    readers = [iter(g) for g in before]
    firsts = [next(r) for r in readers]
    eng.load("v-b", tiny_model_dir_b)
    assert eng.version == "v-b"
    after = [eng.stream(prompt, GREEDY) for _ in range(4)]

    def finish(i: int) -> tuple[str, str]:
        return before[i].version_id, firsts[i] + "".join(readers[i])

    with ThreadPoolExecutor(8) as pool:
        done_before = list(pool.map(finish, range(4)))
        done_after = list(pool.map(lambda g: (g.version_id, "".join(g)), after))
    # ...finish on the old version, whole; everything started after runs on the new one.
    assert done_before == [("v-a", ref_a)] * 4
    assert done_after == [("v-b", ref_b)] * 4
    assert eng.last_swap_seconds > 0


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights with a wide init: greedy answers differ from prompt to prompt and token to
    token, so a batching mistake shows up as a different answer."""
    from tuneloop.train.tiny_model import local_corpus, new_llama, train_tokenizer

    out = tmp_path_factory.mktemp("varied")
    tok = train_tokenizer(local_corpus(100_000), 1024)
    model = new_llama(
        tok,
        seed=3,
        hidden_size=128,
        num_layers=2,
        intermediate_size=512,
        max_position_embeddings=512,
        initializer_range=0.4,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def generate_reference(model_dir: Path, messages: list[Message], n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_batched_decoding_equals_generate_token_for_token(varied_model_dir: Path) -> None:
    eng = EmbeddedEngine(varied_model_dir, "v", max_concurrency=4)
    prompts = [[Message("user", "hi " * (1 + 7 * i))] for i in range(6)]  # uneven lengths
    expected = [generate_reference(varied_model_dir, p, GREEDY.max_tokens) for p in prompts]
    assert len(set(expected)) > 1
    # Six requests, four rows at most: two join as others leave, all of different lengths.
    gens = [eng.stream(p, GREEDY) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda g: "".join(g), gens))
    assert got == expected


def test_sampling_respects_top_p_and_stays_in_the_vocabulary(varied_model_dir: Path) -> None:
    eng = EmbeddedEngine(varied_model_dir, "v")
    prompt = [Message("user", "what is a set?")]
    greedy = "".join(eng.stream(prompt, GREEDY))
    nucleus_of_one = SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6)
    assert "".join(eng.stream(prompt, nucleus_of_one)) == greedy
    hot = [eng.stream(prompt, SamplingParams(24, 1.5, 1.0)) for _ in range(4)]
    texts = ["".join(g) for g in hot]
    assert len(set(texts)) > 1 and all(g.completion_tokens >= 1 for g in hot)
