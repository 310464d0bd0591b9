"""Garbage from Quota (HTML, truncated JSON, wrong types) is "Quota unavailable", never a crash."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.errors import QuotaUnavailable
from sidecar.oauth import QuotaClient, QuotaOAuthError
from tests.support import make_config

ANSWERS: dict[str, tuple[int, str, str]] = {
    "html-200": (200, "text/html", "<html><body>Bad gateway</body></html>"),
    "truncated-json": (200, "application/json", '{"access_token": "quota_tok'),
    "token-not-a-string": (
        200,
        "application/json",
        '{"access_token": 123, "refresh_token": "quota_refresh_x", "expires_in": 3600}',
    ),
    "no-refresh-token": (
        200,
        "application/json",
        '{"access_token": "quota_token_x", "expires_in": 3600}',
    ),
    "expires-in-negative": (
        200,
        "application/json",
        '{"access_token": "quota_token_x", "refresh_token": "quota_refresh_x", "expires_in": -5}',
    ),
    "expires-in-bool": (
        200,
        "application/json",
        '{"access_token": "quota_token_x", "refresh_token": "quota_refresh_x", "expires_in": true}',
    ),
    "json-array": (200, "application/json", "[1, 2, 3]"),
    "html-400": (400, "text/html", "<h1>Bad request</h1>"),
    "bare-502": (502, "text/plain", "upstream connect error"),
    "429": (429, "application/json", '{"error": {"code": "rate_limit_exceeded"}}'),
}


@pytest.fixture
async def garbage(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    choice: dict[str, Any] = {"case": "html-200"}

    async def answer(request: web.Request) -> web.Response:
        status, ctype, body = choice.get("answer") or ANSWERS[choice["case"]]
        return web.Response(status=status, body=body.encode(), content_type=ctype)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), choice


@pytest.fixture
async def client(garbage: tuple[str, dict[str, Any]]) -> AsyncIterator[QuotaClient]:
    config = make_config(quota={"base_url": garbage[0]})
    async with aiohttp.ClientSession() as http:
        yield QuotaClient(http, config.quota)


@pytest.mark.parametrize("case", list(ANSWERS))
async def test_a_garbage_token_answer_is_quota_unavailable(
    client: QuotaClient, garbage: tuple[str, dict[str, Any]], case: str
) -> None:
    garbage[1]["case"] = case
    with pytest.raises(QuotaUnavailable):
        await client.refresh("quota_refresh_abc")
    with pytest.raises(QuotaUnavailable):
        await client.exchange_code(code="c", redirect_uri="http://x/cb", verifier="v")


@pytest.mark.parametrize(
    "body", ['{"error": "invalid_grant"}', '{"error": {"code": "invalid_grant", "message": "no"}}']
)
async def test_both_oauth_error_shapes_are_understood(
    client: QuotaClient, garbage: tuple[str, dict[str, Any]], body: str
) -> None:
    garbage[1]["answer"] = (400, "application/json", body)
    with pytest.raises(QuotaOAuthError) as caught:
        await client.refresh("quota_refresh_abc")
    assert caught.value.code == "invalid_grant"
    assert caught.value.grant_ended


async def test_a_token_in_a_garbage_answer_never_reaches_the_error_message(
    client: QuotaClient, garbage: tuple[str, dict[str, Any]]
) -> None:
    garbage[1]["case"] = "token-not-a-string"
    with pytest.raises(QuotaUnavailable) as caught:
        await client.refresh("quota_refresh_secret_value")
    assert "quota_refresh_secret_value" not in str(caught.value)
    assert "quota_refresh_x" not in str(caught.value)
