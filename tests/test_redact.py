"""Stored and printed text: credentials masked, huge input masked in linear time, control
sequences stripped. Pure functions; no services."""

from __future__ import annotations

import pytest

from polyqueue._redact import MAX_MESSAGE_CHARS, clean, mask_secrets, printable
from polyqueue.db import mask_url
from polyqueue.retry import Backoff


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("could not connect to postgresql://app:hunter2@db:5432/app", "hunter2"),
        ("postgresql://u:p@ss@db/x", "p@ss"),
        ("postgresql://u:p/ss@db/x", "p/ss"),
        ("connect(password=hunter2)", "hunter2"),
        ("DB_PASSWORD=s3cret PGPASSWORD=s3cret", "s3cret"),
        ("client_secret=s3cret&access_token=s3cret", "s3cret"),
        ("{'password': 'two words'}", "two words"),
        ('{"password": "s3cret"}', "s3cret"),
        ("{'Authorization': 'Bearer s3cret'}", "s3cret"),
        ("Authorization: Token s3cret", "s3cret"),
        ("Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=s3cret=;", "s3cret"),
        ("https://acct.blob.core.windows.net/c?sv=2024&sig=s3cret%3D&se=1", "s3cret"),
        ("invalid input for query argument $1: 's3cret' (expected str, got int)", "s3cret"),
    ],
)
def test_credentials_are_masked(text: str, secret: str) -> None:
    masked = mask_secrets(text)
    assert secret not in masked and "***" in masked


def test_ordinary_messages_are_left_alone() -> None:
    for text in ["ValueError: invalid literal for int() with base 10: 'abc'", "connection refused to db:5432"]:
        assert mask_secrets(text) == text


def test_a_query_string_password_is_masked_in_urls() -> None:
    assert "hunter2" not in mask_url("postgresql://app@db/app?password=hunter2")
    assert "hunter2" not in mask_url("postgresql://app:hunter2@db/app")


@pytest.mark.parametrize("unit", ["a-", "v1.", "a://b:", "password=", "deadbeef-"])
def test_masking_huge_adversarial_text_is_linear(unit: str) -> None:
    """A 1 MB message in a handler's exception: the quadratic pattern took minutes (the
    pytest timeout catches a return of it); clean() also caps before it masks."""
    text = unit * (1_000_000 // len(unit))
    mask_secrets(text)
    assert len(clean(text, MAX_MESSAGE_CHARS)) < MAX_MESSAGE_CHARS + 40


def test_clean_drops_nul_characters() -> None:
    assert clean("a\x00b", 100) == "ab"


def test_printable_strips_terminal_control_sequences() -> None:
    assert printable("a\x1b[31mred\x1b[0m\x1b]0;title\x07\tb\n") == "ared\tb\n"


def test_backoff_never_overflows() -> None:
    """A relay retrying a long outage counts thousands of failures."""
    assert Backoff(jitter=False, maximum=2.0).delay(5_000) == 2.0
