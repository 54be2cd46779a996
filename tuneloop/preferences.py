"""Preference functions for `tuneloop simulate`: `f(prompt, response) -> float`, higher is
better. Simulated raters compare two answers with one of these (plus noise); the simulation's
win rate is judged with the same function.

Built-ins are chosen to be what a toy model can visibly learn in a few hundred comparisons, each
a stand-in for a preference real users show:

- `concise`: shorter answers win ("get to the point").
- `no_repeat`: answers that do not repeat themselves win (distinct words, not length).
- `detailed`: longer answers win ("tell me more"): the opposite pull of `concise`.

Any importable callable works too: `--preference package.module:function`.

A preference may also offer a better text for an answer (`improver`): what a simulated user who
edits an answer writes, as the function's `improve(prompt, response) -> str | None` attribute.
`concise` cuts the answer short and `no_repeat` drops repeated words; `detailed` offers none
(nobody types a longer answer for the model), nor does a custom function without the attribute.
Where none is offered, simulated users make no edits.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Preference = Callable[[str, str], float]
# A better text for an answer by some preference, or None where it offers none.
Improver = Callable[[str, str], str | None]

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def concise(prompt: str, response: str) -> float:
    """Fewer words is better; an empty answer is worst."""
    words = len(_words(response))
    return -1000.0 if words == 0 else -float(words)


def no_repeat(prompt: str, response: str) -> float:
    """Distinct words minus repeated ones: long answers gain only by saying new things."""
    words = _words(response)
    distinct = len(set(words))
    return float(distinct - (len(words) - distinct))


def detailed(prompt: str, response: str) -> float:
    """More words is better."""
    return float(len(_words(response)))


def shortened(prompt: str, response: str) -> str | None:
    """`concise`'s edit: the first sentence, or else the first half of the words; None when no
    shorter answer with a word in it is left."""
    first = _SENTENCE_END.split(response.strip(), maxsplit=1)[0]
    words = len(_words(response))
    if 0 < len(_words(first)) < words:
        return first
    tokens = response.split()
    half = " ".join(tokens[: len(tokens) // 2])
    return half if 0 < len(_words(half)) < words else None


def without_repeats(prompt: str, response: str) -> str | None:
    """`no_repeat`'s edit: the answer with each word kept at its first use only; None when no
    word repeats."""
    seen: set[str] = set()
    kept = []
    for token in response.split():
        key = tuple(_words(token))
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(token)
    text = " ".join(kept)
    return text if len(_words(text)) < len(_words(response)) and _words(text) else None


BUILTIN: dict[str, Preference] = {
    "concise": concise,
    "no_repeat": no_repeat,
    "detailed": detailed,
}


# The built-ins offer their edits the way any preference function can: as its `improve`.
concise.improve = shortened  # type: ignore[attr-defined]
no_repeat.improve = without_repeats  # type: ignore[attr-defined]


def improver(spec: str) -> Improver | None:
    """How the preference `spec` would edit an answer (its function's `improve` attribute);
    None where it offers no edit."""
    found = getattr(resolve(spec), "improve", None)
    return found if callable(found) else None


def resolve(spec: str) -> Preference:
    """A built-in name, or `module:function` naming any importable callable."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown preference {spec!r}: use one of {', '.join(BUILTIN)} or module:function"
        )
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load preference {spec!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"preference {spec!r} is not callable")
    return fn
