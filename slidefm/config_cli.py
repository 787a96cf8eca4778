"""Build argparse options from a structured-config dataclass, so the CLI and docs share one source."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        return origin
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for every field of ``cls``; help comes from ``field(metadata={"help": ...})``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_ = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_} (default: {default})")
        elif tp in (list, tuple):
            parser.add_argument(flag, dest=f.name, nargs="+", default=default, help=f"{help_} (default: {default})")
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, dest=f.name, type=type(choices[0]), choices=choices, default=default,
                                help=f"{help_} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float, str) else str, default=default,
                                help=f"{help_} (default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, **override: Any) -> Any:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(override)
    return cls(**kw)
