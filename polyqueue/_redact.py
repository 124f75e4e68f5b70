"""Text that leaves a process or is stored for people to read: credentials masked, size capped,
terminal control sequences removed.

Error messages and tracebacks are written to the jobs table's ``errors`` and printed by the CLI.
They often quote what failed: a DSN with its password (``asyncpg`` puts it there), a connection
string with a SAS key, an ``Authorization`` header. A job's error record is read by whoever may
read the jobs table; a credential must not be among what they read.
"""

from __future__ import annotations

import datetime as dt
import re

from pydantic_core import to_json

__all__ = ["MAX_MESSAGE_CHARS", "MAX_TRACEBACK_CHARS", "cap", "clean", "error_record", "mask_secrets", "printable"]

#: Longest error message stored per attempt; the rest is cut, with a marker.
MAX_MESSAGE_CHARS = 2_000
#: Longest traceback stored per attempt: its end (where the error is raised) is kept.
MAX_TRACEBACK_CHARS = 8_000

MASK = "***"

# scheme://user:password@host  →  scheme://user:***@host. Every repetition is bounded, so a
# match attempt costs O(1) and masking O(n): an unbounded scheme made a 200,000-character
# message take 33 s (quadratic), long enough to get a worker declared dead.
_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://[^\s:/@'\"]{0,256}:)"
    r"(?P<secret>[^\s'\"]{1,256})(?=@)"  # up to the last '@' of the URL: a password may hold '@' and '/'
)
_SECRET_KEYS = (
    r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|"
    r"sharedaccesskey|accountkey|authorization|credentials?"
)
# key=value, key: value, "key": "value", DB_PASSWORD=..., PGPASSWORD=..., client_secret=...,
# Authorization: Bearer ... (DSNs, connection strings, headers, dict and JSON reprs)
_KEY_VALUE = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])(?:[A-Za-z0-9]{1,32}[_-]?)??(?:" + _SECRET_KEYS + r")['\"]?\s{0,8}[=:]\s{0,8})"
    r"(?P<secret>'[^'\n]{0,512}'|\"[^\"\n]{0,512}\"|(?:Bearer|Basic|Token|Digest)\s+[^\s;&,)'\"]+|[^\s;&,)'\"]+)",
    re.IGNORECASE,
)
# an SAS token's signature in a URL query: ...&sig=...
_SIGNATURE = re.compile(r"(?P<head>[?&]sig=)(?P<secret>[^\s&'\"]+)", re.IGNORECASE)
# asyncpg quotes the value it could not encode: "invalid input for query argument $1: 'value' (why)"
_QUERY_ARGUMENT = re.compile(r"(?P<head>query argument \$\d{1,5}: )(?P<secret>.{1,512}?)(?= \(|$)", re.MULTILINE)
# CSI (ESC [ ... final), OSC (ESC ] ... BEL/ST), other ESC sequences and C0/C1 controls except \t and \n
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def mask_secrets(text: str) -> str:
    """``text`` with the passwords of URLs and the values of secret-named keys replaced by ``***``.

    Linear in the length of ``text``; still, cap untrusted text before masking it (:func:`clean`).
    """
    for pattern in (_URL_PASSWORD, _KEY_VALUE, _SIGNATURE, _QUERY_ARGUMENT):
        text = pattern.sub(lambda m: m["head"] + MASK, text)
    return text


def clean(text: str, limit: int) -> str:
    """Stored text: capped (before masking too, so a huge message costs nothing), credentials
    masked, NUL characters removed (Postgres text and JSONB cannot hold them)."""
    return cap(mask_secrets(cap(text, limit + 512)).replace("\x00", ""), limit)


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


def error_record(attempt: int, kind: str, message: str, tb: str | None = None) -> str:
    """One entry of a job's ``errors`` list, as JSON: ``attempt``, ``at``, ``type``, ``message``,
    ``traceback``. Every record the worker stores is built here; the statements that append a
    record in SQL (maintenance's rescue, an operator's fail or cancel, the hand-back of an unknown
    task) build the same keys (``polyqueue.queries.operator.error_record_sql``).

    The message and traceback are stored for whoever reads the jobs table, so credentials in
    them are masked (a DSN's password, a SAS key), and both are capped: the message at its
    start, the traceback at its end, where it was raised, each of its lines like a message.
    """
    return to_json(
        {
            "attempt": attempt,
            "at": dt.datetime.now(dt.UTC).isoformat(),
            "type": kind,
            "message": clean(message, MAX_MESSAGE_CHARS),
            "traceback": None if tb is None else _stored_traceback(tb),
        }
    ).decode()


def _stored_traceback(tb: str) -> str:
    # Each line capped first: a huge exception message is the traceback's last line, and keeping
    # only the end of the whole would keep nothing but that message.
    lines = [cap(line, MAX_MESSAGE_CHARS + 512) for line in tb.splitlines()]  # slicing: cheap
    tail = cap("\n".join(lines), 2 * MAX_TRACEBACK_CHARS, keep="end").splitlines()
    return cap("\n".join(clean(line, MAX_MESSAGE_CHARS) for line in tail), MAX_TRACEBACK_CHARS, keep="end")
