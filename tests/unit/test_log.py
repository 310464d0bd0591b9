"""Logs never carry a credential, however it got into the message."""

from __future__ import annotations

import io
import json
import logging

import pytest

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
