"""The internal listener: /v1 forwarding with the user's token, and the sidecar's own errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.integration.conftest import Stack
from tests.support import json_of, sse_events


async def test_missing_identity_header_is_400_identity_missing(stack: Stack) -> None:
    resp = await stack.backend.post(f"{stack.internal_url}/v1/chat/completions", json={})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "identity_missing"
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Quota-User", "a"), ("X-Quota-User", "b")],
        [("X-Quota-User", "x" * 300)],
        [("X-Quota-User", "a"), ("x_quota_user", "b")],
    ],
)
async def test_ambiguous_or_oversized_identity_is_400_identity_invalid(
    stack: Stack, headers: list[tuple[str, str]]
) -> None:
    resp = await stack.backend.get(f"{stack.internal_url}/v1/models", headers=headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "identity_invalid"


async def test_unknown_user_is_401_wallet_not_connected(stack: Stack) -> None:
    resp = await stack.chat("nobody")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "wallet_not_connected"
    assert stack.quota.counters["chat.completions"] == 0


async def test_client_authorization_is_replaced_not_appended(stack: Stack) -> None:
    await stack.connect("alice")
    resp = await stack.backend.get(
        f"{stack.internal_url}/v1/models",
        headers={"X-Quota-User": "alice", "Authorization": "Bearer sk-quota-attacker"},
    )
    assert resp.status == 200
    seen = [r for r in stack.quota.requests if r.path == "/v1/models"][-1]
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    assert seen.headers["Authorization"] == f"Bearer {record.access_token}"
    assert "X-Quota-User" not in seen.headers


async def test_402_from_quota_passes_through_unchanged(stack: Stack) -> None:
    await stack.connect("alice")
    stack.quota.set_balance("alice@example.com", 0)
    resp = await stack.chat("alice")
    assert resp.status == 402
    body = await resp.json()
    assert body["error"]["code"] == "insufficient_credits"
    assert "request_id" not in body["error"]  # Quota's body, not the sidecar's


async def test_403_from_quota_passes_through_unchanged(stack: Stack) -> None:
    await stack.connect("alice")
    record = await stack.store.get(stack.user_key("alice"))
    assert record is not None
    # A grant without credits.spend, as if the user had connected with a narrower scope.
    narrow = stack.quota.issue_grant(
        stack.client.client_id, "alice@example.com", scope="credits.read"
    )
    from sidecar.tokens.model import TokenRecord

    await stack.store.put(
        stack.user_key("alice"),
        TokenRecord(
            access_token=narrow["access_token"],
            refresh_token=narrow["refresh_token"],
            expires_at=stack.clock() + narrow["expires_in"],
            scope=narrow["scope"],
            obtained_at=stack.clock(),
        ),
    )
    resp = await stack.chat("alice")
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "insufficient_scope"


async def test_stream_chunks_arrive_as_quota_sends_them_and_bytes_are_identical(
    stack: Stack,
) -> None:
    await stack.connect("alice")
    stack.quota.settings.chunk_delay_s = 0.05
    resp = await stack.chat("alice", stream=True)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    arrivals: list[float] = []
    received = b""
    async for chunk in resp.content.iter_any():
        arrivals.append(time.monotonic())
        received += chunk
    # Spaced as sent: many separate reads spread over time, not one burst at the end.
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.05 * 4
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    final = json_of(events[-2])
    assert "quota" in final
    assert final["quota"]["credits_used"] > 0

    # Byte-for-byte what the emulator sends for the same request, asked directly.
    direct_token = stack.quota.issue_grant(stack.client.client_id, "alice@example.com")[
        "access_token"
    ]
    async with aiohttp.ClientSession() as direct:
        d = await direct.post(
            f"{stack.quota_url}/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hello there"}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {direct_token}"},
        )
        direct_body = await d.read()

    def strip(b):
        return [
            {k: v for k, v in json.loads(e[6:]).items() if k not in ("id", "created", "quota")}
            for e in b.decode().split("\n\n")
            if e.startswith("data: {")
        ]

    assert strip(received) == strip(direct_body)


async def test_first_stream_chunk_arrives_before_the_stream_ends(stack: Stack) -> None:
    await stack.connect("alice")
    stack.quota.settings.chunk_delay_s = 0.2
    resp = await stack.chat("alice", stream=True)
    started = time.monotonic()
    events = sse_events(resp)
    first = await asyncio.wait_for(events.__anext__(), timeout=2)
    assert time.monotonic() - started < 0.5  # long before the ~3 s the whole stream takes
    assert json_of(first)["object"] == "chat.completion.chunk"
    resp.close()


@pytest.fixture
def internal_writes(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the internal listener makes to its clients' connections, as the loop sees it."""
    port = int(stack.internal_url.rsplit(":", 1)[1])
    writes: list[bytes] = []
    transport_class = asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    write, writelines = transport_class.write, transport_class.writelines

    def ours(transport: asyncio.Transport) -> bool:
        sockname = transport.get_extra_info("sockname")
        return isinstance(sockname, tuple) and sockname[1] == port

    def spy_write(self: asyncio.Transport, data: bytes) -> None:
        if ours(self):
            writes.append(bytes(data))
        write(self, data)

    def spy_writelines(self: asyncio.Transport, chunks: list[bytes]) -> None:
        if ours(self):
            writes.append(b"".join(chunks))
        writelines(self, chunks)

    monkeypatch.setattr(transport_class, "write", spy_write)
    monkeypatch.setattr(transport_class, "writelines", spy_writelines)
    return writes


async def test_an_answer_that_came_whole_leaves_in_one_write_a_stream_head_at_once(
    stack: Stack, internal_writes: list[bytes]
) -> None:
    await stack.connect("alice")
    resp = await stack.chat("alice")
    body = await resp.read()
    assert resp.status == 200
    [whole] = internal_writes
    assert whole.startswith(b"HTTP/1.1 200")
    assert whole.endswith(body)

    internal_writes.clear()
    stack.quota.settings.chunk_delay_s = 0.05
    resp = await stack.chat("alice", stream=True)
    events = sse_events(resp)
    assert (await anext(events)).startswith("data: ")
    # The head went out on its own, before the first event was there to go with it.
    assert internal_writes[0].startswith(b"HTTP/1.1 200")
    assert internal_writes[0].endswith(b"\r\n\r\n")
    assert [event async for event in events][-1] == "data: [DONE]"


@pytest.mark.parametrize(
    "path",
    [
        "/v1//evil.example/x",
        "/v1/../x",
        "/v1/%2e%2e/x",
        "/v1/%2E%2E/admin",
        "/v1/./models",
        "/v1/..%2fx",
        "/v1/%2fevil.example/x",
        "/v1/a\\b",
        "/v1beta/..",
    ],
)
async def test_paths_that_could_escape_quota_are_refused(stack: Stack, path: str) -> None:
    await stack.connect("alice")
    before = len(stack.quota.requests)
    upstream_before = len(stack.upstream.requests)
    reader, writer = await asyncio.open_connection(
        *stack.internal_url.removeprefix("http://").split(":")
    )
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Quota-User: alice\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    assert status == 400, raw
    assert b"invalid_path" in raw
    assert len(stack.quota.requests) == before  # nothing reached Quota either
    assert len(stack.upstream.requests) == upstream_before


async def test_unknown_internal_path_is_a_json_404(stack: Stack) -> None:
    resp = await stack.backend.get(f"{stack.internal_url}/admin", headers={"X-Quota-User": "a"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_backend_status_and_disconnect_by_header(stack: Stack) -> None:
    status = await stack.backend.get(
        f"{stack.internal_url}/auth/quota/status", headers={"X-Quota-User": "alice"}
    )
    assert (await status.json())["connected"] is False
    await stack.connect("alice")
    status = await stack.backend.get(
        f"{stack.internal_url}/auth/quota/status", headers={"X-Quota-User": "alice"}
    )
    body = await status.json()
    assert body["connected"] is True
    assert body["scopes"] == ["credits.read", "credits.spend"]
    gone = await stack.backend.post(
        f"{stack.internal_url}/auth/quota/disconnect", headers={"X-Quota-User": "alice"}
    )
    assert (await gone.json()) == {"connected": False}
    assert stack.quota.counters["revoke"] == 1
    resp = await stack.chat("alice")
    assert resp.status == 401


INTERNAL_KEY = "k" * 40


@pytest.mark.parametrize("config_overrides", [{"identity": {"internal_api_key": INTERNAL_KEY}}])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {INTERNAL_KEY}"},
        {"x-api-key": INTERNAL_KEY[:-1]},
        {"Authorization": f"Bearer {INTERNAL_KEY}x"},
    ],
)
async def test_the_internal_api_key_is_required_when_configured(
    stack: Stack, headers: dict[str, str]
) -> None:
    await stack.connect("alice")
    resp = await stack.backend.get(
        f"{stack.internal_url}/v1/models", headers={"X-Quota-User": "alice", **headers}
    )
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    assert not [r for r in stack.quota.requests if r.path == "/v1/models"]


@pytest.mark.parametrize("config_overrides", [{"identity": {"internal_api_key": INTERNAL_KEY}}])
@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {INTERNAL_KEY}"}, {"x-api-key": INTERNAL_KEY}]
)
async def test_the_internal_api_key_is_accepted_as_bearer_or_x_api_key_and_never_forwarded(
    stack: Stack, headers: dict[str, str]
) -> None:
    await stack.connect("alice")
    resp = await stack.backend.get(
        f"{stack.internal_url}/v1/models", headers={"X-Quota-User": "alice", **headers}
    )
    assert resp.status == 200
    sent = [r for r in stack.quota.requests if r.path == "/v1/models"][-1]
    assert INTERNAL_KEY not in repr(sent.headers)
    assert sent.headers["Authorization"].startswith("Bearer quota_token_")


@pytest.mark.parametrize("name", ["x-api-key", "x-goog-api-key", "api-key"])
async def test_sdk_credential_headers_never_reach_quota(stack: Stack, name: str) -> None:
    await stack.connect("alice")
    await stack.backend.get(
        f"{stack.internal_url}/v1/models",
        headers={"X-Quota-User": "alice", name: "sk-quota-hostappkey"},
    )
    sent = [r for r in stack.quota.requests if r.path == "/v1/models"][-1]
    assert name not in {h.lower() for h in sent.headers}


@pytest.mark.parametrize(
    "config_overrides",
    [{"limits": {"max_v1_body_bytes": 4096}, "quota": {"replay_max_bytes": 1024}}],
)
@pytest.mark.parametrize("size", [5000, 3000])
async def test_v1_bodies_over_the_limit_are_413_whether_or_not_they_were_buffered(
    stack: Stack, size: int
) -> None:
    await stack.connect("alice")

    async def chunked() -> AsyncIterator[bytes]:
        yield b"{"
        for _ in range(size // 500):
            yield b" " * 500
        yield b"}"

    resp = await stack.backend.post(
        f"{stack.internal_url}/v1/chat/completions",
        data=chunked(),
        headers={"X-Quota-User": "alice", "Content-Type": "application/json"},
    )
    if size > 4096:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"
    else:
        assert resp.status == 400  # reached Quota, which found no model in it
