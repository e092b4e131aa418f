"""A static check of a Dockerfile, for `make compose-check` (hadolint is not packaged in Debian).

    python -m tests.dockerfile_check controlplane/Dockerfile [--context .]

Rules (each problem is printed as `path:line: message`; the exit status is 1 if there is any):
- every FROM names a tag other than `latest` (or a digest), and the final stage's base is slim, alpine or
  distroless;
- the final stage sets a USER that is neither root nor 0, after its last RUN;
- no ADD of a URL (fetch with a checked download in a RUN, or COPY from the repository);
- every `pip install` passes `--no-cache-dir` (or PIP_NO_CACHE_DIR is set);
- no `sudo`;
- no ENV or ARG whose name looks like a secret (*_KEY, *_TOKEN, *SECRET*, *PASSWORD*, ...) with a literal
  value: secrets come from the environment at run time;
- every COPY (and local ADD) source exists in the build context (--context; default the current
  directory, the repository root under make) and is not left out by the context's .dockerignore.
Only the standard library: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

SLIM_BASES = ("slim", "alpine", "distroless")
SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)|SECRET|PASSWORD|PASSWD",
                         re.IGNORECASE)
PIP_INSTALL = re.compile(r"\bpip[0-9.]*\s+install\b")
URL = re.compile(r"^(https?|ftp)://|^git@", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    line: int  # where it starts, 1-based
    keyword: str  # upper case
    args: str  # the rest, continuation lines joined


def parse(text: str) -> list[Instruction]:
    """Instructions in order; comments and blank lines dropped, `\\` continuations joined."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if pending:
        joined = " ".join(part for part in pending if part)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


def _words(args: str) -> list[str]:
    """An instruction's arguments: JSON (exec) form or shell words."""
    if args.startswith("["):
        try:
            value = json.loads(args)
        except ValueError:
            pass
        else:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    try:
        return shlex.split(args)
    except ValueError:
        return args.split()


def _flags(words: list[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest = list(words)
    while rest and rest[0].startswith("--"):
        name, _, value = rest.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, rest


def _env_pairs(args: str) -> list[tuple[str, str]]:
    """ENV/ARG `a=1 b=2`, `NAME value` (legacy ENV) or `NAME` (ARG without a default: value "")."""
    words = _words(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(name, value) for name, _, value in (w.partition("=") for w in words)]


def _image_problems(image: str) -> list[str]:
    if image.startswith("$"):
        return [f"base image {image} comes from a build argument; pin it in the Dockerfile"]
    if "@sha256:" in image:
        return []
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return [f"base image {image} has no tag (it means :latest); pin a version, e.g. python:3.11-slim"]
    if name.rsplit(":", 1)[1] == "latest":
        return [f"base image {image} is :latest; pin a version, e.g. python:3.11-slim"]
    return []


def _ignored(source: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave `source` (or a folder above it) out of the context."""
    parts = Path(source).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            matches = any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, pattern[3:])
                          for c in candidates)
        else:
            matches = any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
        if matches:
            excluded = not negate
    return excluded


def _dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _source_problems(source: str, context: Path, ignore: list[str]) -> list[str]:
    """A COPY/ADD source that is not in the build context, or that .dockerignore leaves out."""
    relative = source.lstrip("/")
    found = any(context.glob(relative)) if any(c in relative for c in "*?[") else (context / relative).exists()
    if not found:
        return [f"{source}: not found in the build context {context}"]
    if _ignored(relative, ignore):
        return [f"{source}: left out of the build context by {context / '.dockerignore'}"]
    return []


def check(dockerfile: Path, context: Path | None = None) -> list[str]:
    """Every problem as `path:line: message`; empty when the Dockerfile passes."""
    context = context if context is not None else Path.cwd()
    instructions = parse(dockerfile.read_text())
    ignore = _dockerignore(context)
    problems: list[tuple[int, str]] = []
    bases: dict[str, str] = {}  # stage name -> the image it starts from
    final_from: Instruction | None = None
    final_base = ""
    final_start = 0
    pip_cache_off = False

    for index, ins in enumerate(instructions):
        words = _words(ins.args)
        if ins.keyword == "FROM":
            _, rest = _flags(words)
            if not rest:
                problems.append((ins.line, "FROM without an image"))
                continue
            image = rest[0]
            if image.lower() in bases:  # an earlier stage: its own FROM was checked
                image = bases[image.lower()]
            else:
                problems.extend((ins.line, p) for p in _image_problems(image))
            if len(rest) >= 3 and rest[1].upper() == "AS":
                bases[rest[2].lower()] = image
            final_from, final_base, final_start = ins, image, index
            pip_cache_off = False
        elif ins.keyword == "ADD":
            _, rest = _flags(words)
            for source in rest[:-1]:
                if URL.search(source):
                    problems.append((ins.line, f"ADD {source}: no downloads in ADD; COPY from the repository, "
                                               "or fetch and verify a checksum in a RUN"))
                else:
                    problems.extend((ins.line, f"ADD {p}") for p in _source_problems(source, context, ignore))
        elif ins.keyword in ("ENV", "ARG"):
            for name, value in _env_pairs(ins.args):
                if name.upper() == "PIP_NO_CACHE_DIR" and value.lower() in ("1", "true", "yes", "on"):
                    pip_cache_off = True
                if value and not value.startswith("$") and SECRET_NAME.search(name):
                    problems.append((ins.line, f"{ins.keyword} {name} has a literal value and looks like a "
                                               "secret; pass it at run time from the environment"))
        elif ins.keyword == "RUN":
            if re.search(r"(^|[\s;&|(])sudo\s", ins.args):
                problems.append((ins.line, "RUN uses sudo; the build runs as root already (drop privileges "
                                           "with USER)"))
            for segment in re.split(r"&&|\|\||;|\|", ins.args):
                if PIP_INSTALL.search(segment) and "--no-cache-dir" not in segment and not pip_cache_off:
                    problems.append((ins.line, "pip install without --no-cache-dir (its cache would stay in "
                                               "the image)"))
        elif ins.keyword == "COPY":
            flags, rest = _flags(words)
            if "from" in flags:  # from another stage or image, not the build context
                continue
            for source in rest[:-1]:
                problems.extend((ins.line, f"COPY {p}") for p in _source_problems(source, context, ignore))

    if final_from is None:
        problems.append((1, "no FROM"))
        return [f"{dockerfile}:{line}: {message}" for line, message in sorted(problems)]
    if not any(kind in final_base.lower() for kind in SLIM_BASES):
        problems.append((final_from.line, f"base image {final_base} is not slim, alpine or distroless "
                                          "(e.g. python:3.11-slim)"))
    final = instructions[final_start:]
    users = [ins for ins in final if ins.keyword == "USER"]
    runs = [ins for ins in final if ins.keyword == "RUN"]
    if not users:
        problems.append((final_from.line, "no USER: the container would run as root; add USER <uid> after "
                                          "the last RUN"))
    else:
        last = users[-1]
        user = (_words(last.args) or [""])[0].split(":", 1)[0]
        if user in ("root", "0", ""):
            problems.append((last.line, f"USER {last.args}: the container must not run as root"))
        if runs and runs[-1].line > last.line:
            problems.append((runs[-1].line, "RUN after the last USER: set the USER after the last RUN"))
    return [f"{dockerfile}:{line}: {message}" for line, message in sorted(problems)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.dockerfile_check", description=__doc__.splitlines()[0])
    parser.add_argument("dockerfiles", nargs="+", type=Path)
    parser.add_argument("--context", type=Path, default=Path("."),
                        help="the build context COPY reads from (default: the current directory)")
    args = parser.parse_args(argv)
    failed = False
    for dockerfile in args.dockerfiles:
        if not dockerfile.is_file():
            print(f"{dockerfile}: no such file", file=sys.stderr)
            failed = True
            continue
        problems = check(dockerfile, args.context)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            failed = True
            print(f"{dockerfile}: {len(problems)} problem(s)", file=sys.stderr)
        else:
            print(f"{dockerfile}: ok (pinned slim base, non-root USER, no ADD URL, pip --no-cache-dir, no sudo, "
                  "no literal secrets, COPY sources present)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
