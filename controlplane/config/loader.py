"""Reading the operator's YAML file into the model, with every error worded for a person.

Loading never raises on the first problem: it collects every error, each naming
the file, line, pool, backend and field, so an operator fixes a file in one pass.
Secrets and webhook URLs are never echoed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .model import Config

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_FIELDS = frozenset({"api_key"})  # only from the environment, never echoed
_HIDDEN_FIELDS = _SECRET_FIELDS | {"webhook"}  # never echoed (webhook URLs often carry a token)

Lines = dict[tuple[Any, ...], int]  # the line of every key, by its path


class ConfigError(Exception):
    """Every problem found in one file, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, source=str(path), env=os.environ if env is None else env)


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    data, lines, errors = read_yaml(text, source, "a 'pools' section", "envoy, controlplane, pools")
    failed: set[tuple[Any, ...]] = set()
    data = _substitute(data, (), env, lines, errors, source, failed)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors += [
            describe_error(e, lines, source)
            for e in exc.errors()
            if _clean_loc(e["loc"]) not in failed
        ]
    if errors:
        raise ConfigError(errors)
    return config


def read_yaml(text: str, source: str, needs: str, top_keys: str) -> tuple[dict[str, Any], Lines, list[str]]:
    """A YAML mapping, the line of every key, and the duplicate keys found (as errors).

    Syntax errors, an empty file and a top level that is not a mapping raise
    ConfigError at once: nothing further can be said about such a file.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{at}: YAML syntax error: {problem}"]) from None
    if root is None:
        raise ConfigError([f"{source}: file is empty; it needs at least {needs}"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the top level must be a mapping ({top_keys})"])
    lines: Lines = {}
    errors: list[str] = []
    _index_lines(root, (), lines, errors, source)
    return data, lines, errors


def _index_lines(node: yaml.Node, path: tuple[Any, ...], lines: Lines, errors: list[str], source: str) -> None:
    """Record the line of every key, and refuse duplicate keys (YAML would keep the last)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in first:
                errors.append(
                    f"{source}:{line}: {where(path + (key,))}: duplicate key {key!r} "
                    f"(first at line {first[key]})"
                )
                continue
            first[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, errors, source)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, errors, source)


def _substitute(
    value: Any,
    path: tuple[Any, ...],
    env: Mapping[str, str],
    lines: Lines,
    errors: list[str],
    source: str,
    failed: set[tuple[Any, ...]],
) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string values from the environment."""
    if isinstance(value, dict):
        return {k: _substitute(v, path + (k,), env, lines, errors, source, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, path + (i,), env, lines, errors, source, failed) for i, v in enumerate(value)]
    if path and path[-1] in _SECRET_FIELDS and value is not None:
        if not isinstance(value, str) or not _ENV_REF.fullmatch(value.strip()):
            errors.append(
                f"{source_line(path, lines, source)}: {where(path)}: must name an environment "
                "variable, e.g. ${PROVIDER_KEY}; keys are never written in config files"
            )
            failed.add(path)
            return None
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append(f"{source_line(path, lines, source)}: {where(path)}: environment variable {name} is not set")
        failed.add(path)
        return ""

    return _ENV_REF.sub(replace, value)


def source_line(path: tuple[Any, ...], lines: Lines, source: str) -> str:
    """`file:line` of the nearest key along `path` that the file has."""
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{source}:{lines[path[:cut]]}"
    return source


def where(loc: tuple[Any, ...]) -> str:
    """Name the pool, backend and field of a location in words."""
    loc = tuple(loc)
    if len(loc) >= 2 and loc[0] == "pools":
        text = f"pool {loc[1]!r}"
        rest = loc[2:]
        if len(rest) >= 2 and rest[0] == "backends":
            text += f", backend {rest[1]!r}"
            rest = rest[2:]
        if rest:
            text += f", field {'.'.join(map(str, rest))!r}"
        return text
    return f"field {'.'.join(map(str, loc))!r}" if loc else "top level"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def describe_error(error: Any, lines: Lines, source: str, model: type[BaseModel] | None = None) -> str:
    """One pydantic error as `file:line: pool ..., backend ..., field ...: message`."""
    loc = _clean_loc(error["loc"])
    msg: str = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], model or Config)
        msg = f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif error["type"] == "missing":
        msg = "required field is missing"
    elif error["type"] == "too_short" and loc and loc[-1] in ("pools", "backends"):
        msg = f"needs at least one entry under {loc[-1]!r}"
    elif (
        loc
        and loc[-1] not in _HIDDEN_FIELDS
        and not isinstance(error.get("input"), (dict, list, type(None)))
        and repr(error["input"]) not in msg
    ):
        msg += f" (got {error['input']!r})"
    return f"{source_line(loc, lines, source)}: {where(loc)}: {msg}"


def _allowed_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    """Walk the model along `loc` to list the keys that are valid there."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return annotation
