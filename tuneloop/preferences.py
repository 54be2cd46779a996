"""Preference functions for `tuneloop simulate`: `f(prompt, response) -> float`, higher is
better. Simulated raters compare two answers with one of these (plus noise); the simulation's
win rate is judged with the same function.

Built-ins are chosen to be what a toy model can visibly learn in a few hundred comparisons, each
a stand-in for a preference real users show:

- `concise`: shorter answers win ("get to the point").
- `no_repeat`: answers that do not repeat themselves win (distinct words, not length).
- `detailed`: longer answers win ("tell me more"): the opposite pull of `concise`.

Any importable callable works too: `--preference package.module:function`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Preference = Callable[[str, str], float]

_WORD = re.compile(r"[a-z0-9']+")


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


BUILTIN: dict[str, Preference] = {
    "concise": concise,
    "no_repeat": no_repeat,
    "detailed": detailed,
}


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
