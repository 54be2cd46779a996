"""Tiny Llama chat models built offline: a local text corpus, a BPE tokenizer, random weights.

Everything here runs without network access. The text comes from the Python installation itself:
the `pydoc_data.topics` help texts and the docstrings of the standard library (and of the builtins),
all distributed under the Python Software Foundation License, which allows copying and
redistribution. Nothing is downloaded.

Tokenizers saved by `train_tokenizer` follow transformers 5, which does not save `padding_side`:
whoever loads one must set it (`tok.padding_side = "left"` for batched generation, "right" for
training).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"

# ChatML. The `generation` block marks assistant replies, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (and TRL's `assistant_only_loss`)
# can tell which tokens the model wrote.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Default amount of text the tiny models' tokenizer learns from: enough for a 1k vocabulary, small
# enough to train in a fraction of a second.
# vLLM's CPU attention kernels take head sizes of 32 and up (32, 64, 80, ...): every model built
# here has heads of 32, so that the vLLM engine can serve the tiny models and the demo.
HEAD_DIM = 32
_TINY_CORPUS_CHARS = 200_000

# With the usual 0.02, a random model's output is dominated by the tied embedding of the last input
# token, so every seed greedily repeats it ("\n\n\n..."). Wider weights let the layers, and so the
# seed, decide what comes out.
_TINY_INIT_STD = 0.1

# Standard-library folders whose docstrings are tests, tools or generated boilerplate.
_SKIPPED_STDLIB_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)
_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_SENTENCE_END = re.compile(r"[.!?][\"')]*$")


class LocalDocument(NamedTuple):
    """A piece of prose about one subject (a pydoc section title, or a qualified Python name)."""

    subject: str
    text: str


def local_documents(max_chars: int) -> list[LocalDocument]:
    """Prose found in this Python installation, in a fixed order, about `max_chars` long in total.

    First the `pydoc_data.topics` sections, then builtin docstrings, then standard-library
    docstrings (parsed with `ast`, never imported). Code samples, grammar rules and signature lines
    are dropped; duplicates are skipped. PSF License (see the module docstring).
    """
    docs: list[LocalDocument] = []
    seen: set[str] = set()
    total = 0
    for doc in _all_documents():
        if doc.text in seen:
            continue
        seen.add(doc.text)
        docs.append(doc)
        total += len(doc.text)
        if total >= max_chars:
            break
    return docs


def local_corpus(max_chars: int) -> list[str]:
    """License-clean English text (PSF License) from this machine; see `local_documents`."""
    return [doc.text for doc in local_documents(max_chars)]


def _all_documents() -> Iterator[LocalDocument]:
    yield from _pydoc_documents()
    yield from _builtin_documents()
    yield from _stdlib_documents()


def _pydoc_documents() -> Iterator[LocalDocument]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for title, body in _sections(topics[key]):
            text = _prose(body)
            if text:
                yield LocalDocument(title, text)


def _sections(text: str) -> Iterator[tuple[str, str]]:
    """Split a pydoc topic into (title, body) pairs; titles are underlined with *, =, - etc."""
    lines = text.splitlines()
    title, start = None, 0
    for i in range(1, len(lines)):
        if _UNDERLINE.match(lines[i].strip()) and lines[i - 1].strip():
            if title is not None:
                yield title, "\n".join(lines[start : i - 1])
            title, start = lines[i - 1].strip(), i + 1
    if title is not None:
        yield title, "\n".join(lines[start:])


def _builtin_documents() -> Iterator[LocalDocument]:
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj):
            continue
        yield from _docstring_document(name, inspect.getdoc(obj))
        if isinstance(obj, type):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_"):
                    yield from _docstring_document(f"{name}.{attr}", inspect.getdoc(member))


def _stdlib_documents() -> Iterator[LocalDocument]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in _SKIPPED_STDLIB_DIRS for p in parts[:-1]):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if any(p.startswith("_") for p in module.split(".")):
            continue
        yield from _module_documents(module, path)


def _module_documents(module: str, path: Path) -> Iterator[LocalDocument]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    yield from _docstring_document(f"the {module} module", ast.get_docstring(tree))
    yield from _definition_documents(module, tree.body)


def _definition_documents(prefix: str, body: list[ast.stmt]) -> Iterator[LocalDocument]:
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in body:
        if isinstance(node, defs) and not node.name.startswith("_"):
            name = f"{prefix}.{node.name}"
            yield from _docstring_document(name, ast.get_docstring(node))
            if isinstance(node, ast.ClassDef):
                yield from _definition_documents(name, node.body)


def _docstring_document(subject: str, docstring: str | None) -> Iterator[LocalDocument]:
    text = _prose(docstring or "")
    if text:
        yield LocalDocument(subject, text)


def _prose(text: str) -> str:
    """Keep the prose paragraphs of `text`, each joined onto one line, separated by blank lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.splitlines()
        if _is_prose(lines):
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def _is_prose(lines: list[str]) -> bool:
    first = lines[0] if lines else ""
    joined = " ".join(line.strip() for line in lines)
    letters = sum(c.isalpha() or c == " " for c in joined)
    return (
        bool(first.strip())
        and not first[0].isspace()
        and not first.startswith(">>>")
        and "::=" not in joined
        and not _SIGNATURE.match(first.strip())
        and _SENTENCE_END.search(joined) is not None
        and len(joined.split()) >= 4
        and letters >= 0.8 * len(joined)
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens and chat template.

    `<|im_start|>` is the bos token, `<|im_end|>` the eos token, `<|pad|>` the pad token (ids 0, 1,
    2). Nothing is added automatically when encoding: the chat template writes the special tokens.
    `padding_side` is not saved by transformers 5; loaders must set it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[IM_START, IM_END, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=IM_START, eos_token=IM_END, pad_token=PAD
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def new_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    max_position_embeddings: int,
    initializer_range: float = 0.02,
) -> LlamaForCausalLM:
    """A randomly initialised Llama for `tokenizer`: heads of HEAD_DIM, tied embeddings.

    The special-token ids are set in both the config and the generation config (eos =
    `<|im_end|>`), so that `generate` stops at the end of a ChatML turn. The global torch RNG is
    left untouched.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {HEAD_DIM}, got {hidden_size}")
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD),
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        num_key_value_heads=hidden_size // HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 1024,
    texts: Iterable[str] | None = None,
) -> Path:
    """Save a random-weight Llama chat model and its tokenizer into `out_dir`, for tests.

    Different seeds give different weights (the tokenizer depends only on `texts` and
    `vocab_size`). Contexts hold 512 tokens; generation defaults to greedy decoding of up to 32
    new tokens. Takes a fraction of a second once transformers is imported.
    """
    tokenizer = train_tokenizer(
        local_corpus(_TINY_CORPUS_CHARS) if texts is None else texts, vocab_size
    )
    model = new_llama(
        tokenizer,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=512,
        initializer_range=_TINY_INIT_STD,
    )
    model.generation_config.max_new_tokens = 32
    tokenizer.model_max_length = model.config.max_position_embeddings
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_random_lora(base_dir: Path, out_dir: Path, *, r: int = 8, seed: int = 0) -> Path:
    """Save a LoRA adapter over `base_dir` with random (not zero) B matrices, and the base's
    tokenizer, into `out_dir`: a policy version that answers differently from its base, for
    swap tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        get_peft_model(model, config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return Path(out_dir)
