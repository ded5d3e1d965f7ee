"""Strict JSON text for what goes into jsonb columns. Imports nothing from taskd.

PostgreSQL's jsonb rejects NaN and Infinity, the escaped NUL character and text
that is not valid UTF-8 (a lone surrogate, as in a file name decoded with
surrogateescape), so a value holding any of them is refused here, with a clear
message, before it can fail a whole batched statement.
"""

from __future__ import annotations

import json
import re
from typing import Any

# \u0000 in the encoded text is a NUL only when its backslash is not itself escaped
# (a string holding a backslash followed by "u0000" encodes as \\u0000).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


class NotJsonError(ValueError):
    """The value cannot be stored as JSON."""


def dumps(value: Any) -> str:
    """Encode value as JSON text that PostgreSQL's jsonb accepts, or raise NotJsonError."""
    try:
        text = _encoder.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise NotJsonError(str(exc)) from None
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise NotJsonError("strings containing the NUL character (U+0000) cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotJsonError(f"text that is not valid UTF-8 cannot be stored ({exc.reason})") from None
    return text


def storable(text: str) -> str:
    """Text that jsonb accepts, whatever it held: NUL and lone surrogates escaped
    (as \\x00 and \\udc80), everything else kept."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def loads(text: str | None) -> Any:
    """Decode JSON text from the database (None stays None)."""
    return None if text is None else json.loads(text)
