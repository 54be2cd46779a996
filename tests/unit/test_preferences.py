"""Built-in preference functions and loading one by `module:function`."""

from __future__ import annotations

import pytest

from tuneloop.preferences import BUILTIN, resolve


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
