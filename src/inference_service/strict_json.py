"""Strict RFC 8259 JSON in and out, safe against nesting bombs.

Python's ``json`` reads and writes ``NaN``, ``Infinity`` and ``1e999`` (as infinity), passes lone
UTF-16 surrogates through strings, and recurses once per nesting level, so that a 2 KB record
nested 1,000 deep raises ``RecursionError``. Here:

* :func:`check` walks a parsed value without recursion and names the first thing a strict reader
  would refuse (a non-finite number, a string that is not valid Unicode, nesting deeper than the
  limit);
* :func:`prune` rewrites a document nested too deep for the parser, replacing every container
  below the limit by ``null``, so that its top-level fields can still be read;
* :func:`dumps` writes UTF-8 (no ``\\u`` escapes for non-ASCII: a result stays close to its task's
  size) and refuses non-finite numbers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting a task may have (a result adds one level; common strict readers stop at
1,000)."""

_SPECIAL = re.compile(rb'["\\\[\]{}]')


class StrictJsonError(ValueError):
    """A parsed value that strict JSON cannot carry."""


def dumps(value: Any) -> bytes:
    """Compact strict JSON in UTF-8; raises ``ValueError`` for non-finite numbers or lone
    surrogates."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`StrictJsonError` naming the first problem of ``value``, if any."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise StrictJsonError(f"{_path(path)} nests deeper than {max_depth} levels")
            for key, child in item.items():
                _check_text(key, f"a key of {path}")
                stack.append((child, depth + 1, f"{path}.{_short(key)}"))
        elif isinstance(item, list):
            if depth > max_depth:
                raise StrictJsonError(f"{_path(path)} nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str):
            _check_text(item, _path(path))
        elif isinstance(item, float) and not math.isfinite(item):
            raise StrictJsonError(
                f"{_path(path)} is {item!r}: JSON has no NaN or Infinity (and 1e999 overflows)"
            )


def is_strict(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    try:
        check(value, max_depth)
    except StrictJsonError:
        return False
    return True


def prune(data: bytes, max_depth: int = MAX_DEPTH) -> bytes:
    """``data`` with every array or object deeper than ``max_depth`` replaced by ``null``.

    A linear scan over the structural characters only; strings (with their escapes) are copied
    untouched. Unbalanced input stays unbalanced (the parser then refuses it).
    """
    out = bytearray()
    depth = 0
    copied = 0  # data[:copied] is accounted for in out
    skip_from: int | None = None  # start of a container being dropped
    skip_depth = 0
    in_string = False
    escaped_at = -1
    for match in _SPECIAL.finditer(data):
        pos = match.start()
        char = data[pos]
        if pos == escaped_at:
            continue
        if in_string:
            if char == 0x5C:  # backslash: the next byte is escaped
                escaped_at = pos + 1
            elif char == 0x22:
                in_string = False
            continue
        if char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth and skip_from is None:
                skip_from, skip_depth = pos, depth
        elif char in (0x5D, 0x7D):
            if skip_from is not None and depth == skip_depth:
                out += data[copied:skip_from] + b"null"
                copied = pos + 1
                skip_from = None
            depth -= 1
    if skip_from is not None:
        out += data[copied:skip_from]
    else:
        out += data[copied:]
    return bytes(out)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJsonError(
            f"{where} holds a lone UTF-16 surrogate (not valid Unicode)"
        ) from None


def _path(path: str) -> str:
    """A JSON path short enough for a message (deep paths keep their ends)."""
    return path if len(path) <= 80 else f"{path[:40]}...{path[-30:]}"


def _short(key: str) -> str:
    shown = key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return shown if len(shown) <= 40 else shown[:37] + "..."
