"""Command-line options made from the settings dataclasses (`tuneloop.core.settings`): each
field given an `option` there is one `--option` here, with its type, default, choices and help,
so a setting is added in one place and shows up in every command that takes its dataclass."""

from __future__ import annotations

import argparse
import typing
from typing import Any, TypeVar

from tuneloop.core.settings import choices, options

Settings = TypeVar("Settings")


def add_options(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One `--option` (or positional argument) per exposed field of `settings_class`: a bool is a
    switch (`--no-x` for one that defaults to true), a tuple a repeatable option."""
    hints = typing.get_type_hints(settings_class)
    for key, f in options(settings_class):
        flag = f.metadata["flag"] or "--" + key.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")
        hint = hints[f.name]
        if hint is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, dest=key, action=action, help=help_text)
            continue
        if typing.get_origin(hint) is tuple:
            metavar = f.metadata.get("metavar") or "KEY=VALUE"
            parser.add_argument(
                flag, dest=key, action="append", default=[], metavar=metavar, help=help_text
            )
            continue
        value_type = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        if f.metadata["positional"]:
            parser.add_argument(key, type=value_type, choices=choices(f), help=help_text)
            continue
        shown = "" if f.default is None else " (default: %(default)s)"
        parser.add_argument(
            flag,
            dest=key,
            type=value_type,
            default=f.default,
            choices=choices(f),
            help=help_text + shown,
        )


def settings_from_args(
    settings_class: type[Settings], args: argparse.Namespace, **fixed: Any
) -> Settings:
    """`settings_class(**fixed)` with its exposed fields as `args` gives them."""
    given: dict[str, Any] = {f.name: getattr(args, key) for key, f in options(settings_class)}
    return settings_class(**fixed, **given)


def option_values(settings_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The exposed options as `args` gives them, by option name: the admin API's request
    fields (how the CLI hands them to a running server)."""
    return {key: getattr(args, key) for key, _ in options(settings_class)}
