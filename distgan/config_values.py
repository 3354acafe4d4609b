"""How a config value is written and checked: YAML 1.2 parsing, the `Rule` next to each field
(`setting`), type coercion of YAML/command-line values (numbers, lists, `Scheduled`, optional
values) and the field docstrings that --help-config prints. `distgan/config.py` declares the
sections with these; nothing here knows the sections.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from distgan.errors import ConfigError
from distgan.schedules import Scheduled


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. (YAML 1.1 reads `off`, `no`, `on` as booleans,
    which would turn `logging.wandb: off` into False.)"""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass(frozen=True)
class Rule:
    """The values a config field accepts, declared next to the field (see `setting`)."""

    choices: tuple = ()
    at_least: float | None = None
    greater_than: float | None = None
    less_than: float | None = None
    at_most: float | None = None

    def describe(self) -> str:
        """`must be ...` text (also shown by --help-config)."""
        if self.choices:
            return "must be " + _either([repr(c) if isinstance(c, str) else str(c) for c in self.choices if c != ""])
        bounds = [f"at least {self.at_least:g}" if self.at_least is not None else "",
                  f"greater than {self.greater_than:g}" if self.greater_than is not None else "",
                  f"less than {self.less_than:g}" if self.less_than is not None else "",
                  f"at most {self.at_most:g}" if self.at_most is not None else ""]
        return "must be " + " and ".join(b for b in bounds if b)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (tuple, list)):  # e.g. Adam betas: the rule holds for each value
            return all(self.accepts(v) for v in value)
        if value is None:  # optional fields: unset is always allowed
            return True
        if isinstance(value, Scheduled):  # a schedule: both of its ends
            return all(self.accepts(v) for v in value.endpoints())
        if self.choices:
            return value in self.choices
        return ((self.at_least is None or value >= self.at_least)
                and (self.greater_than is None or value > self.greater_than)
                and (self.less_than is None or value < self.less_than)
                and (self.at_most is None or value <= self.at_most))


def setting(default: Any, **rule: Any) -> Any:
    """A field with a default and the Rule its values must follow (checked by `validate`)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _plain(value: Any) -> Any:
    if isinstance(value, Scheduled):
        return value.to_plain()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_docs(section_cls: type) -> dict[str, str]:
    """The docstring under each field, read from the class source."""
    try:
        tree = ast.parse(inspect.getsource(section_cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin is types.UnionType:  # `X | None`: empty or null leaves the field unset
        if value is None or value == "":
            return None
        return _coerce(value, next(t for t in typing.get_args(typ) if t is not type(None)), key)
    if typ is Scheduled:
        return Scheduled.parse(value, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, t, key) for v, t in zip(value, args))
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in value]
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."
