"""Every line the sidecar logs during a whole flow is free of tokens, codes and secrets."""

from __future__ import annotations

import logging

import pytest

from sidecar.log import JsonFormatter
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
