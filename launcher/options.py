"""Command-line options generated from the config dataclasses in `disagg.config`.

Each field becomes a flag (`flag_name`), its default the field's default, its
help the field's docstring, its choices a `Literal` annotation's values; each
flag can also come from a `DISAGG_<FLAG>` environment variable. Reading the
parsed arguments back into the dataclass (`config_from_args`) and turning a
config back into flags for a child process (`config_to_args`) use the same
names, so a setting is spelled once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")

UNIT_SUFFIXES = ("_s", "_bytes")
TRUE_WORDS = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    """`--kv-cache-memory` -> `DISAGG_KV_CACHE_MEMORY`."""
    return "DISAGG_" + flag.lstrip("-").replace("-", "_").upper()


def flag_name(field_name: str) -> str:
    """`num_kv_blocks` -> `--kv-blocks`, `ready_timeout_s` -> `--ready-timeout`."""
    name = field_name.removeprefix("num_")
    for suffix in UNIT_SUFFIXES:
        name = name.removesuffix(suffix)
    return "--" + name.replace("_", "-")


def add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Like `add_argument`, but the environment variable, when set, replaces the default.

    NOTE: argparse runs `type` over string defaults, so an environment value is
    parsed and validated exactly like the same value given on the command line.
    """
    name = env_name(flag)
    if name in os.environ:
        value = os.environ[name]
        is_switch = kwargs.get("action") == "store_true"
        kwargs["default"] = value.lower() in TRUE_WORDS if is_switch else value
        if kwargs.get("action") == "append":  # a repeatable flag: comma-separated values
            kwargs["default"] = [v for v in value.split(",") if v]
        kwargs.pop("required", None)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source, as vLLM does)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if is_field and _is_string(following):
            docs[node.target.id] = following.value.value.strip()
    return docs


def _is_string(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and (isinstance(node.value.value, str))
    )


def _option_kwargs(cls: type, field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dest": field.name,
        "default": field.default,
        "help": field_docs(cls).get(field.name, ""),
    }
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif hint is bool:
        kwargs["action"] = "store_true"
    elif typing.get_origin(hint) is tuple:  # `tuple[str, ...]`: a repeatable flag
        kwargs["action"] = "append"
        kwargs["default"] = None
    elif typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        kwargs["type"] = args[0]  # `int | None`: None stays the default
    elif hint in (int, float):
        kwargs["type"] = hint
    if "type" in kwargs or hint is str:
        kwargs["metavar"] = flag_name(field.name).lstrip("-").replace("-", "_").upper()
    return kwargs


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of `cls`, except `exclude` and flags the parser already has.

    `defaults` overrides a field's default for this command only.
    """
    hints = typing.get_type_hints(cls)
    existing = set(parser._option_string_actions)
    for field in dataclasses.fields(cls):
        flag = flag_name(field.name)
        if field.name in exclude or flag in existing:
            continue
        kwargs = _option_kwargs(cls, field, hints[field.name])
        if defaults and field.name in defaults:
            kwargs["default"] = defaults[field.name]
        add_option(parser, flag, **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """The dataclass with every field the parser knows taken from `args`."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    return cls(**(values | overrides))


def config_to_args(config: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """Flags that give a child process the same config (None and False are left out)."""
    words: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in exclude or value is None:
            continue
        flag = flag_name(field.name)
        if isinstance(value, bool):
            words += [flag] if value else []
        elif isinstance(value, tuple):
            words += [word for item in value for word in (flag, str(item))]
        else:
            words += [flag, str(value)]
    return words
