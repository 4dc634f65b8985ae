"""Every key of the schema in one listing: its dotted name, type, default and help.

Contract: `describe(prefix="")` -> one line per key of RunConfig (nested groups flattened:
`scoring.alternatives: int = 32  # J: ...`), the keys under `prefix` only when given. A key's
help is its field's `metadata["help"]` (the settings that workers declare: ScoreConfig,
UpdateConfig), else the comment on the field's own lines, else the comment lines right above
it: the schema's comments are its help, so nothing is written twice. `python -m
orchestrator.config [prefix]` prints it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

from orchestrator.config.schema import RunConfig


def describe(prefix: str = "") -> list[str]:
    """The listing of every key whose dotted name starts with `prefix`."""
    return [line for line in key_lines(RunConfig) if line.startswith(prefix)]


def key_lines(schema: type, prefix: str = "") -> list[str]:
    hints, helps = typing.get_type_hints(schema), field_help(schema)
    lines = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            lines += key_lines(kind, f"{prefix}{f.name}.")
            continue
        shown = f"{prefix}{f.name}: {type_name(kind)} = {default_of(f)}"
        lines.append(f"{shown}  # {helps[f.name]}" if helps.get(f.name) else shown)
    return lines


def type_name(kind: Any) -> str:
    """`int`, `str | None`, `list[ModelConfig]`: without module paths."""
    text = kind.__name__ if isinstance(kind, type) else str(kind)
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(group)"
    return "???" if value == "???" else repr(value)


def field_help(schema: type) -> dict[str, str]:
    """{field: help} of `schema` and its dataclass bases (see the module docstring)."""
    helps: dict[str, str] = {}
    for klass in reversed(schema.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(comment_help(klass))
    for f in dataclasses.fields(schema):
        if f.metadata.get("help"):
            helps[f.name] = f.metadata["help"]
    return helps


def comment_help(klass: type) -> dict[str, str]:
    """{field: its comments} from the class's source; {} for a class without source (one made
    by `make_dataclass`, whose fields carry their help in metadata)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    helps = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        helps[node.target.id] = " ".join(own or above)
    return helps
