"""An answer's HTTP chunks leave the sidecar as they came: chunks that arrive together in one
read are not merged, so an SSE event the app sent alone reaches the client alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.conftest import Stack

EVENTS = [f"data: {i}\n\n".encode() for i in range(5)]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[str]:
    """Answers every request with five chunks in a single write: one read for the sidecar."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /empty "):
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def store_kind() -> str:
    return "memory"


@pytest.fixture
def config_overrides(raw_upstream: str) -> dict[str, dict[str, Any]]:
    return {"upstream": {"url": raw_upstream}}


async def test_chunks_that_arrive_together_leave_as_they_were_framed(stack: Stack) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/events")
    assert resp.status == 200
    chunks: list[bytes] = []
    partial = b""
    async for data, end_of_chunk in resp.content.iter_chunks():
        partial += data
        if end_of_chunk:
            chunks.append(partial)
            partial = b""
    assert chunks == EVENTS


async def test_body_less_answers_end_every_time(stack: Stack) -> None:
    """204s (like 304s and HEAD answers) have no body to relay; the second one must end too."""
    for _ in range(3):
        resp = await asyncio.wait_for(stack.browser.get(f"{stack.public_url}/empty"), 10)
        assert resp.status == 204
        assert await asyncio.wait_for(resp.read(), 10) == b""
