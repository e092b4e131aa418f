"""Reading the operator's YAML file into the model, with every error worded for a person.

Loading never raises on the first problem: it collects every error, each naming
the file, line, pool, backend and field, so an operator fixes a file in one pass.
Secrets and webhook URLs are never echoed, and a value that came from the environment is shown as
written (`${VAR}`), never substituted.

Hostile or careless files are refused before they cost anything: a size cap, a nesting cap, and no YAML
anchors or aliases (a few hundred bytes of aliases expand to gigabytes: "billion laughs").
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .model import Config

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_FIELDS = frozenset({"api_key", "token", "key"})  # only from the environment, never echoed
_HIDDEN_FIELDS = _SECRET_FIELDS | {"webhook"}  # never echoed (webhook URLs often carry a token)

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: far above any real config, far below what hurts
MAX_CONFIG_DEPTH = 64  # nested mappings/sequences; a real config needs about 8

Lines = dict[tuple[Any, ...], int]  # the line of every key, by its path
Written = dict[tuple[Any, ...], tuple[str, str]]  # (as written, as substituted) of every `${...}` value, by its path


class ConfigError(Exception):
    """Every problem found in one file, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    return config_from_bytes(read_config_file(path), str(path), env)


def read_config_file(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; a file over MAX_CONFIG_BYTES is refused without reading it all."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > MAX_CONFIG_BYTES:
                raise ConfigError([_too_big(str(path))])
            data = f.read(MAX_CONFIG_BYTES + 1)  # bounded even for a device or a file still growing
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(str(path))])
    return data


def config_from_bytes(data: bytes, source: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: not UTF-8 text"]) from None
    return parse_config(text, source=source, env=os.environ if env is None else env)


def _too_big(source: str) -> str:
    return f"{source}: file is larger than {MAX_CONFIG_BYTES} bytes ({MAX_CONFIG_BYTES >> 20} MiB), the most a config may be"


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    data, lines, errors = read_yaml(text, source, "a 'pools' section", "envoy, controlplane, clients, pools")
    failed: set[tuple[Any, ...]] = set()
    written: Written = {}
    data = _substitute(data, (), env, lines, errors, source, failed, written)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors += [
            describe_error(e, lines, source, written=written)
            for e in exc.errors()
            if _clean_loc(e["loc"]) not in failed
        ]
    if errors:
        raise ConfigError(errors)
    return config


class _RefusedError(Exception):
    """A file refused while composing, before anything was built from it."""


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and deep nesting as the parser meets them.

    The checks run on each event before its node is composed, so an alias is never followed and
    nesting never recurses past MAX_CONFIG_DEPTH (about three Python frames a level).
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = f"{self.source}:{event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedError(f"{line}: YAML anchors and aliases are not allowed (write each value out in full)")
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        if self.depth >= MAX_CONFIG_DEPTH:
            raise _RefusedError(f"{line}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml(text: str, source: str, needs: str, top_keys: str) -> tuple[dict[str, Any], Lines, list[str]]:
    """A YAML mapping, the line of every key, and the duplicate keys found (as errors).

    Syntax errors, an empty file and a top level that is not a mapping raise
    ConfigError at once: nothing further can be said about such a file.
    """
    if len(text) > MAX_CONFIG_BYTES:  # characters: never more than the bytes
        raise ConfigError([_too_big(source)])
    loader = _GuardedLoader(text, source)
    try:
        root = loader.get_single_node()  # composed once; anchors, aliases and deep nesting refused here
        data = loader.construct_document(root) if root is not None else None
    except _RefusedError as exc:
        raise ConfigError([str(exc)]) from None
    except RecursionError:  # not reachable through the depth cap; never let it escape as a crash
        raise ConfigError([f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{at}: YAML syntax error: {problem}"]) from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML cannot build: a 5,000-digit int, a bad date
        raise ConfigError([f"{source}: YAML value cannot be read: {exc}"]) from None
    finally:
        loader.dispose()
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
    written: Written,
) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string values from the environment (noting each value as
    written, so that errors show it instead of what the environment put there)."""
    if isinstance(value, dict):
        return {k: _substitute(v, path + (k,), env, lines, errors, source, failed, written) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, path + (i,), env, lines, errors, source, failed, written) for i, v in enumerate(value)]
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

    result = _ENV_REF.sub(replace, value)
    if result != value:
        written[path] = (value, result)
    return result


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


def describe_error(
    error: Any, lines: Lines, source: str, model: type[BaseModel] | None = None, written: Written | None = None
) -> str:
    """One pydantic error as `file:line: pool ..., backend ..., field ...: message`.

    Values that came from the environment are shown as written in the file (`${VAR}`), never substituted.
    """
    loc = _clean_loc(error["loc"])
    written = written or {}
    msg: str = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], model or Config)
        msg = f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif error["type"] == "missing":
        msg = "required field is missing"
    elif error["type"] == "too_short" and loc and loc[-1] in ("pools", "backends"):
        msg = f"needs at least one entry under {loc[-1]!r}"
    else:
        msg = _as_written(msg, loc, written)
        shown = written[loc][0] if loc in written else error.get("input")
        if (
            loc
            and loc[-1] not in _HIDDEN_FIELDS
            and not isinstance(shown, (dict, list, type(None)))
            and repr(shown) not in msg
        ):
            msg += f" (got {shown!r})"
    return f"{source_line(loc, lines, source)}: {where(loc)}: {msg}"


def _as_written(msg: str, loc: tuple[Any, ...], written: Written) -> str:
    """`msg` with every substituted value a validator quoted put back as written in the file: the field's
    own value always, another field's (e.g. in a cross-check) when long enough not to be a common word."""
    for path, (text, value) in written.items():
        if value and value not in text and (path == loc or len(value) >= 6):
            msg = msg.replace(repr(value), repr(text))
            msg = re.sub(rf"(?<![\w.-]){re.escape(value)}(?![\w.-])", text.replace("\\", "\\\\"), msg)
    return msg


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
