"""Logs never carry a credential, however it got into the message."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.log import JsonFormatter, TextFormatter, redact

SECRETS = [
    "quota_token_abcDEF123_-xyz",
    "quota_refresh_R3fr3sh-tok.en",
    "quota_secret_s3cr3t",
    "sk-quota-developerkey",
    "sess_devsession123",
    "whsec_webhooksecret",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_quota_credentials_are_masked_by_prefix(secret: str) -> None:
    out = redact(f"calling with {secret} now")
    assert secret not in out
    assert secret.split("_")[0] in out or secret.startswith("sk-")


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("Authorization: Bearer opaque.jwt.value", "opaque.jwt.value"),
        ("header authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("GET /auth/quota/callback?code=abc123&state=def456", "abc123"),
        ("GET /auth/quota/callback?code=abc123&state=def456", "def456"),
        ('{"refresh_token": "rt-value", "x": 1}', "rt-value"),
        ("form client_secret=topsecret&code_verifier=vvv", "topsecret"),
        ("form client_secret=topsecret&code_verifier=vvv", "vvv"),
        ("Cookie: quota_sidecar=gAAAAAB; other=1", "gAAAAAB"),
    ],
)
def test_credential_shaped_values_are_masked(text: str, hidden: str) -> None:
    assert hidden not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "quota_token_x1",
        "quota_refresh_x1",
        "quota_secret_x1",
        "sk-quota-x1",
        "sess_x1",
        "whsec_x1",
        "BEARER x1",
        "basic x1",
        "CODE=x1",
        "state=x1",
        "code_verifier=x1",
        "Refresh_Token=x1",
        "access_token=x1",
        "client_secret=x1",
        "token=x1",
        "key=x1",
        "API_KEY=x1",
        "cookie: x1",
        "Set-Cookie: x1",
        "authorization=x1",
        "\u017ftate=x1",  # a long s: the patterns ignore case the Unicode way
    ],
)
def test_every_kind_of_credential_the_patterns_know_is_masked(text: str) -> None:
    assert "x1" not in redact(f"GET /path?{text} HTTP")


_FRAGMENTS = st.sampled_from(
    [
        *("quota_", "token", "TOKEN", "_", "-", "sk-quota-", "sess_", "whsec_", "Bearer"),
        *("basic", "code", "state", "key", "Secret", "cookie", "Authorization", "=", ": "),
        *('"', "'", " ", "&", "?", "/", "v1", "abc", "9f"),
    ]
)


@given(st.lists(_FRAGMENTS | st.characters(max_codepoint=127), max_size=40).map("".join))
def test_text_with_nothing_to_mask_is_returned_as_the_patterns_would_leave_it(text: str) -> None:
    # Text that is not ASCII always goes through every pattern; a line break cannot be part of
    # a masked run, so appending one and a non-ASCII letter shows what the patterns make of it.
    assert redact(text) == redact(text + "\n\u00e9").removesuffix("\n\u00e9")


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_a_token_logged_through_args_extra_or_exception_is_masked(
    formatter: logging.Formatter,
) -> None:
    logger, stream = _capture(formatter)
    token = "quota_token_LEAKME123"
    logger.info("token %s", token)
    logger.info("extra", extra={"detail": f"Bearer {token}"})
    try:
        raise ValueError(f"bad {token}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert token not in text
    assert "LEAKME" not in text


def test_json_lines_are_valid_json_with_a_request_id() -> None:
    logger, stream = _capture(JsonFormatter())
    logger.info("hello", extra={"status": 200})
    entry = json.loads(stream.getvalue().splitlines()[0])
    assert entry["msg"] == "hello"
    assert entry["status"] == 200
    assert entry["request_id"] == "-"
    assert entry["level"] == "info"


def test_the_text_format_keeps_extra_fields_and_still_masks_them() -> None:
    logger, stream = _capture(TextFormatter())
    logger.info(
        "connect failed", extra={"detail": "Quota said invalid_token", "auth": "Bearer abc"}
    )
    line = stream.getvalue()
    assert "detail=Quota said invalid_token" in line
    assert "abc" not in line
