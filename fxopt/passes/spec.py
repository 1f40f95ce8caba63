"""The pass-spec language: one parser and one printer, used by the CLI, TOML files and Python.

Grammar::

    pipeline := item ("," item)*
    item     := NAME ["{" (KEY "=" VALUE)* "}"]      NAME: a pass or a named pipeline
    VALUE    := WORD | NUMBER | true | false | none | "quoted" | "[" [VALUE ("," VALUE)*] "]"

``str(pipeline)`` prints the canonical text, every option with its value, and
parsing that text gives the same pipeline back.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from fxopt.errors import PipelineError
from fxopt.passes.base import Pass, format_pass, format_value, type_name

__all__ = [
    "format_pass",
    "format_value",
    "named_pipelines",
    "parse_pipeline",
    "registered_passes",
    "type_name",
    "unknown_name",
]


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<punct>[{}\[\],=])
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>[^']*)'
      | (?P<word>[^\s{}\[\],="']+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Item:
    name: str
    options: dict[str, Any]
    column: int


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline spec at column {pos + 1}: {text!r}")
        column = m.start() + (len(m.group(0)) - len(m.group(0).lstrip())) + 1
        if m.group("punct"):
            tokens.append(("punct", m.group("punct"), column))
        elif m.group("dq") is not None:
            tokens.append(("str", re.sub(r"\\(.)", r"\1", m.group("dq")), column))
        elif m.group("sq") is not None:
            tokens.append(("str", m.group("sq"), column))
        else:
            tokens.append(("word", m.group("word"), column))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, message: str) -> PipelineError:
        column = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text) + 1
        return PipelineError(f"{message} at column {column} of pipeline spec {self.text!r}")

    def peek(self, value: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        kind, tok, _ = self.tokens[self.i]
        return value is None or (kind == "punct" and tok == value)

    def expect(self, value: str) -> None:
        if not self.peek(value):
            raise self.error(f"expected '{value}'")
        self.i += 1

    def items(self) -> list[_Item]:
        items: list[_Item] = []
        if not self.tokens:
            return items
        while True:
            items.append(self.item())
            if not self.peek():
                return items
            self.expect(",")

    def item(self) -> _Item:
        if not self.peek() or self.tokens[self.i][0] != "word":
            raise self.error("expected a pass name")
        _, name, column = self.tokens[self.i]
        self.i += 1
        options: dict[str, Any] = {}
        if self.peek("{"):
            self.i += 1
            while not self.peek("}"):
                if not self.peek() or self.tokens[self.i][0] != "word":
                    raise self.error(f"expected an option name or '}}' in the options of '{name}'")
                key = self.tokens[self.i][1]
                self.i += 1
                self.expect("=")
                if key in options:
                    raise self.error(f"option '{key}' of '{name}' given twice")
                options[key] = self.value()
            self.i += 1
        return _Item(name, options, column)

    def value(self) -> Any:
        if self.peek("["):
            self.i += 1
            values = []
            while not self.peek("]"):
                values.append(self.value())
                if not self.peek("]"):
                    self.expect(",")
            self.i += 1
            return values
        if not self.peek() or self.tokens[self.i][0] == "punct":
            raise self.error("expected a value")
        kind, tok, _ = self.tokens[self.i]
        self.i += 1
        return tok if kind == "str" else _Raw(tok)


class _Raw(str):
    """An unquoted word: its type is decided by the option it is given to."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and isinstance(value, _Raw) and value.lower() == "none":
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, where)
            except PipelineError:
                pass
        raise PipelineError(f"{where} expects {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == str(value):
                return choice
        raise PipelineError(f"{where} expects one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is tuple:
        (item_tp, *_) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(v, item_tp, where) for v in items)
    if isinstance(value, list):
        raise PipelineError(f"{where} expects {type_name(tp)}, got a list")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise PipelineError(f"{where} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise PipelineError(f"{where} expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise PipelineError(f"{where} expects a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported option type {tp}")  # a pass declared an option type the grammar lacks


def registered_passes() -> dict[str, type[Pass]]:
    from fxopt.passes import registry  # deferred: the registry imports every pass, which import this module

    return registry.PASSES


def named_pipelines() -> dict[str, str]:
    from fxopt.passes import registry

    return registry.BUILTIN_PIPELINES


def _instantiate(item: _Item) -> Pass:
    registry = registered_passes()
    cls = registry[item.name]
    by_name = {o.name: o for o in cls.options()}
    kwargs = {}
    for key, value in item.options.items():
        opt = by_name.get(key) or by_name.get(key.replace("_", "-"))
        if opt is None:
            known = ", ".join(by_name) or "none"
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PipelineError(f"pass '{item.name}' has no option '{key}'{hint} (its options: {known})")
        kwargs[opt.field] = _convert(value, opt.type, f"option '{opt.name}' of pass '{item.name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a pass's own __post_init__ validation
        raise PipelineError(f"pass '{item.name}': {exc}") from None


def unknown_name(name: str) -> PipelineError:
    candidates = list(registered_passes()) + list(named_pipelines())
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return PipelineError(f"unknown pass or pipeline '{name}'{hint} (`fxopt passes` lists them)")


def parse_pipeline(spec: str, _expanding: tuple[str, ...] = ()) -> list[Pass]:
    """Parse a spec string into pass objects, expanding named pipelines."""
    passes: list[Pass] = []
    for item in _Parser(spec).items():
        if item.name in registered_passes():
            passes.append(_instantiate(item))
        elif item.name in named_pipelines():
            if item.options:
                raise PipelineError(f"named pipeline '{item.name}' takes no options")
            if item.name in _expanding:
                raise PipelineError(f"named pipeline '{item.name}' includes itself")
            passes.extend(parse_pipeline(named_pipelines()[item.name], _expanding + (item.name,)))
        else:
            raise unknown_name(item.name)
    return passes
