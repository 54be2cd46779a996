"""Built-in preference functions and loading one by `module:function`."""

from __future__ import annotations

import pytest

from tuneloop.preferences import BUILTIN, improver, resolve


def test_builtins_order_answers_as_documented() -> None:
    concise, detailed, no_repeat = BUILTIN["concise"], BUILTIN["detailed"], BUILTIN["no_repeat"]
    short, long = "A list holds items.", "A list holds items in order and can grow or shrink."
    assert concise("q", short) > concise("q", long) > concise("q", "")
    assert detailed("q", long) > detailed("q", short)
    assert no_repeat("q", "one two three") > no_repeat("q", "one one one one one")


def test_resolve_by_name_or_module_function_with_clear_errors() -> None:
    assert resolve("concise") is BUILTIN["concise"]
    assert resolve("tuneloop.preferences:detailed") is BUILTIN["detailed"]
    with pytest.raises(ValueError, match="unknown preference 'kind'.*module:function"):
        resolve("kind")
    with pytest.raises(ValueError, match="cannot load preference 'no.such:f'"):
        resolve("no.such:f")
    with pytest.raises(ValueError, match="not callable"):
        resolve("tuneloop.preferences:BUILTIN")


def test_a_preference_may_offer_a_better_text_and_the_builtins_that_do_are_right() -> None:
    """What a simulated user who edits an answer writes: better by the preference itself, or
    no edit at all (`detailed`, or a function without `improve`)."""
    answer = "A list holds items in order. It can grow or shrink, and it can grow again."
    for name in ("concise", "no_repeat"):
        improve, preference = improver(name), resolve(name)
        assert improve is not None
        edited = improve("q", answer)
        assert edited and preference("q", edited) > preference("q", answer), (name, edited)
    assert improver("concise")("q", "Yes.") is None  # nothing shorter is left
    assert improver("no_repeat")("q", "one two three") is None  # nothing repeats
    assert improver("concise")("q", "one two three four") == "one two"  # no sentence: half
    assert improver("detailed") is None
    assert improver("tuneloop.preferences:concise") is improver("concise")
    assert improver("tests.unit.test_preferences:_plain") is None


def _plain(prompt: str, response: str) -> float:
    return 0.0
