"""Every line the sidecar logs during a whole flow is free of tokens, codes and secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from sidecar.log import SAFE_FIELDS, JsonFormatter, LoopFlushedHandler, TextFormatter
from tests.integration.conftest import Stack


@pytest.fixture
def json_lines() -> list[str]:
    lines: list[str] = []
    formatter = JsonFormatter()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_a_whole_flow_logs_no_token_code_state_or_secret(
    stack: Stack, json_lines: list[str]
) -> None:
    landed = await stack.connect("alice")
    assert landed.status == 200
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    # Refresh, a failed refresh, a forwarded call with a client Authorization, and disconnect.
    stack.clock.now = record.expires_at - 1
    assert (await stack.chat("alice")).status == 200
    refreshed = await stack.store.get(stack.user_key("alice"))
    assert refreshed is not None
    await stack.backend.get(
        f"{stack.internal_url}/v1/models",
        headers={"X-Quota-User": "alice", "Authorization": "Bearer sk-quota-clientkey123"},
    )
    await stack.backend.post(
        f"{stack.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "alice"}
    )
    callback = next(r for r in stack.quota.requests if r.path == "/oauth/token")
    code = callback.body.decode().split("code=")[1].split("&")[0]

    text = "\n".join(json_lines)
    assert any('"listener": "public"' in line for line in json_lines), "access log lines exist"
    assert any('"listener": "internal"' in line for line in json_lines)
    for secret in (
        record.access_token,
        record.refresh_token,
        refreshed.access_token,
        refreshed.refresh_token,
        stack.client.client_secret,
        stack.config.session.secret.reveal(),
        "sk-quota-clientkey123",
        code,
    ):
        assert secret not in text


async def test_the_access_log_leaves_out_callback_query_strings(
    stack: Stack, json_lines: list[str]
) -> None:
    await stack.connect("alice")
    callback_lines = [
        line
        for line in json_lines
        if '"logger": "sidecar.access"' in line and "/auth/quota/callback" in line
    ]
    assert callback_lines
    assert not any("code=" in line or "state=" in line for line in callback_lines), "\n".join(
        callback_lines
    )


def access_lines(json_lines: list[str]) -> list[dict[str, Any]]:
    return [entry for entry in map(json.loads, json_lines) if entry["logger"] == "sidecar.access"]


async def test_an_access_line_has_every_field_and_masks_what_a_client_sent(
    stack: Stack, json_lines: list[str]
) -> None:
    """The access line skips the whole-line redaction, so each client-chosen string is masked
    on its own: the path with its query, and a request id that looks like a credential."""
    resp = await stack.browser.get(
        f"{stack.public_url}/echo?access_token=quota_token_leak123&x=1",
        headers={"X-Request-Id": "sess_leakedsession"},
    )
    assert resp.status == 200
    [entry] = [e for e in access_lines(json_lines) if e["path"].startswith("/echo")]
    assert "quota_token_leak123" not in json.dumps(entry)
    assert "sess_leakedsession" not in json.dumps(entry)
    assert entry["path"] == "/echo?access_token=***&x=1"
    assert entry["request_id"] == "sess_***"
    assert entry["msg"] == "GET /echo?access_token=***&x=1 200"
    assert entry["level"] == "info"
    assert entry["ts"].endswith("Z")
    for field in ("listener", "method", "status", "bytes", "duration_ms", "route", "remote"):
        assert field in entry, field
    assert entry["listener"] == "public"
    assert entry["status"] == 200


def test_the_text_format_writes_the_access_fields() -> None:
    record = logging.LogRecord("sidecar.access", logging.INFO, __file__, 1, "GET / 200", (), None)
    setattr(record, SAFE_FIELDS, {"request_id": "abc", "status": 200, "path": "/"})
    line = TextFormatter().format(record)
    assert "[abc]" in line
    assert "status=200" in line
    assert "path=/" in line


async def test_lines_written_in_one_loop_turn_are_flushed_together(tmp_path: Path) -> None:
    class CountingStream(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            CountingStream.flushes += 1
            super().flush()

    stream = CountingStream()
    handler = LoopFlushedHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.flush")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for n in range(50):
            logger.warning("line %d", n)
        assert stream.getvalue().count("\n") == 50  # written at once …
        assert CountingStream.flushes == 0  # … flushed later
        await asyncio.sleep(0)
        assert CountingStream.flushes == 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
