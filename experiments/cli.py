"""A command line for any config dataclass: `--<field> <value>` overrides that field.

Values are parsed by the field's annotation: int, float, str, bool ("true"/"false"), an
optional type (`none` for None), and tuples (comma-separated, e.g. `--mesh 2,2,2`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

Config = TypeVar("Config")


def _parser_for(annotation: Any):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = _parser_for(next(a for a in args if a is not type(None)))
        return lambda text: None if text.lower() == "none" else inner(text)
    if origin is tuple:
        item = _parser_for(args[0])
        return lambda text: tuple(item(t) for t in text.split(",") if t)
    if annotation is bool:
        def parse_bool(text: str) -> bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
            return text.lower() in ("true", "1")
        return parse_bool
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line parser for a field of type {annotation!r}")


def parse_config(cls: type[Config], argv: Sequence[str] | None = None, *,
                 prog: str | None = None) -> Config:
    """`cls()` with the fields given on the command line replaced.

    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     steps: int = 10
    ...     mesh: tuple[int, ...] = (1, 1, 1)
    >>> parse_config(C, ["--mesh", "2,2,2"])
    C(steps=10, mesh=(2, 2, 2))
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = cls()
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name}", type=_parser_for(hints[field.name]),
                            default=argparse.SUPPRESS,
                            help=f"default: {getattr(defaults, field.name)!r}")
    return dataclasses.replace(defaults, **vars(parser.parse_args(argv)))
