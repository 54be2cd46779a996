"""Command-line options made from the settings dataclasses (`tuneloop.core.settings`): each
field given an `option` there is one `--option` here, with its type, default, choices and help,
so a setting is added in one place and shows up in every command that takes its dataclass."""

from __future__ import annotations

import argparse
import typing
from dataclasses import replace
from typing import Any, TypeVar

from tuneloop.core.settings import options

Settings = TypeVar("Settings")


def add_options(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One `--option` per exposed field of `settings_class`."""
    hints = typing.get_type_hints(settings_class)
    for key, f in options(settings_class):
        flag = "--" + key.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=key, action="store_true", help=help_text)
            continue
        value_type = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        parser.add_argument(
            flag,
            dest=key,
            type=value_type,
            default=f.default,
            choices=f.metadata["choices"] or None,
            help=f"{help_text} (default: %(default)s)",
        )


def settings_from_args(settings_class: type[Settings], args: argparse.Namespace) -> Settings:
    """`settings_class` with its exposed fields as `args` gives them."""
    given: dict[str, Any] = {f.name: getattr(args, key) for key, f in options(settings_class)}
    return replace(settings_class(), **given)  # type: ignore[type-var]


def option_values(settings_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The exposed options as `args` gives them, by option name: the admin API's request
    fields (how the CLI hands them to a running server)."""
    return {key: getattr(args, key) for key, _ in options(settings_class)}
