"""Text that leaves a process or is stored for people to read: credentials masked, size capped,
terminal control sequences removed.

Error messages and tracebacks are written to ``polyqueue_jobs.errors`` and printed by the CLI.
They often quote what failed: a DSN with its password (``asyncpg`` puts it there), a connection
string with a SAS key, an ``Authorization`` header. A job's error record is read by whoever may
read the jobs table; a credential must not be among what they read.
"""

from __future__ import annotations

import re

__all__ = ["MAX_MESSAGE_CHARS", "MAX_TRACEBACK_CHARS", "cap", "mask_secrets", "printable"]

#: Longest error message stored per attempt; the rest is cut, with a marker.
MAX_MESSAGE_CHARS = 2_000
#: Longest traceback stored per attempt: its end (where the error is raised) is kept.
MAX_TRACEBACK_CHARS = 8_000

MASK = "***"

# scheme://user:password@host  →  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]*:)(?P<secret>[^\s@/'\"]+)(?=@)")
# key=value / key: value pairs whose key says it holds a secret (DSNs, connection strings, headers)
_KEY_VALUE = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"sharedaccesskey|accountkey|sig|authorization|aws_secret_access_key|aws_session_token)"
    r"\s*[=:]\s*['\"]?)(?P<secret>(?:Bearer\s+|Basic\s+)?[^\s;&,)'\"]+)",
    re.IGNORECASE,
)
# CSI (ESC [ ... final), OSC (ESC ] ... BEL/ST), other ESC sequences and C0/C1 controls except \t and \n
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def mask_secrets(text: str) -> str:
    """``text`` with the passwords of URLs and the values of secret-named keys replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _KEY_VALUE.sub(lambda m: m["head"] + MASK, text)


def cap(text: str, limit: int, *, keep: str = "start") -> str:
    """``text`` cut to about ``limit`` characters with a marker saying how much went; ``keep="end"``
    keeps the end instead (a traceback's last frames say where it was raised)."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    if keep == "end":
        return f"[{cut} characters cut]\n" + text[-limit:]
    return text[:limit] + f" [{cut} characters cut]"


def printable(text: str) -> str:
    """``text`` without terminal control sequences (colours, cursor moves, title changes, bells),
    so stored text printed by the CLI cannot rewrite the operator's screen."""
    return _CONTROL.sub("", text)
