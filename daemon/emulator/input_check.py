"""Create-time check of an uploaded input file, as the real API does it (INSPECT #3257):
``400 INVALID_ARGUMENT "Error on line N: invalid JSON, near column C: no such field: 'x'"``.

Streaming and bounded: the file is read in blocks of whole lines; a block is parsed as one JSON
array (one ``orjson`` call), and only a block that fails is parsed line by line to find the bad
lines. At most ``MAX_REPORTED`` bad lines are reported.
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from daemon.emulator.answers import snake

BLOCK_BYTES = 8 * 1024 * 1024
MAX_REPORTED = 1000
LINE_FIELDS = ("key", "request", "metadata")
# GenerateContentRequest (v1beta discovery, 2026) and EmbedContentRequest fields.
GENERATE_FIELDS = (
    "model",
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "safetySettings",
    "generationConfig",
    "cachedContent",
    "serviceTier",
    "store",
    "labels",
)
EMBED_FIELDS = ("model", "content", "taskType", "title", "outputDimensionality")


def _allowed(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names) | {snake(n) for n in names}


_LINE = _allowed(LINE_FIELDS)
_REQUEST = {False: _allowed(GENERATE_FIELDS), True: _allowed(EMBED_FIELDS)}


def _column(line: bytes, name: str) -> int:
    at = line.find(orjson.dumps(name))
    return at + 1 if at >= 0 else 1


def line_problem(line: bytes, obj: Any, embed: bool) -> str | None:
    """Why one parsed line would be refused, or None."""
    if not isinstance(obj, dict):
        return "invalid JSON, near column 1: expected an object"
    request_fields = _REQUEST[embed]
    if isinstance(obj.get("request"), dict):
        unknown = [k for k in obj if k not in _LINE]
        unknown += [k for k in obj["request"] if k not in request_fields]
    else:  # a bare request line: the request's own fields, plus key/metadata
        unknown = [k for k in obj if k not in request_fields and k not in _LINE]
    if not unknown:
        return None
    name = unknown[0]
    return f"invalid JSON, near column {_column(line, name)}: no such field: '{name}'"


def _all_fine(objs: list[Any], embed: bool) -> bool:
    """The common case, checked without a Python loop per line: every line an object with
    known fields (a ``request`` object of known fields, or bare requests only)."""
    try:
        tops = set().union(*map(dict.keys, objs))  # TypeError unless all are dicts
        if tops <= _LINE and "request" in tops:
            requests = list(map(itemgetter("request"), objs))  # KeyError if one has none
            return set().union(*map(dict.keys, requests)) <= _REQUEST[embed]
    except (TypeError, KeyError):
        return False
    return tops <= _REQUEST[embed] | _LINE and "request" not in tops


def _parse_problem(line: bytes, embed: bool) -> str | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return f"invalid JSON, near column {e.pos + 1}: {e.msg}"
    return line_problem(line, obj, embed)


def _check_block(lines: list[bytes], first: int, embed: bool, out: list[str]) -> None:
    """Check lines numbered ``first``…; append one message per bad line to ``out``."""
    numbered = [(first + i, ln) for i, ln in enumerate(lines) if ln.strip()]
    try:
        objs = orjson.loads(b"[" + b",".join(ln for _, ln in numbered) + b"]")
    except orjson.JSONDecodeError:
        objs = None
    if objs is not None and len(objs) == len(numbered) and _all_fine(objs, embed):
        return
    if objs is not None and len(objs) == len(numbered):
        problems = [
            (n, ln, line_problem(ln, o, embed)) for (n, ln), o in zip(numbered, objs, strict=True)
        ]
    else:  # some line is not JSON (or holds two values): look at each line
        problems = [(n, ln, _parse_problem(ln, embed)) for n, ln in numbered]
    for n, _, problem in problems:
        if problem is not None and len(out) < MAX_REPORTED:
            out.append(f"Error on line {n}: {problem}")


def check_input_file(path: Path, *, embed: bool) -> str | None:
    """The create's 400 message for ``path`` (one ``Error on line N: ...`` per bad line, joined
    with newlines), or None when every line is acceptable. Blank lines count in line numbers."""
    errors: list[str] = []
    line_no = 1
    rest = b""
    with path.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            lines = block[:cut].split(b"\n")[:-1]
            _check_block(lines, line_no, embed, errors)
            line_no += len(lines)
            if len(errors) >= MAX_REPORTED:
                break
        else:
            if rest:
                _check_block([rest], line_no, embed, errors)
    return "\n".join(errors) or None
