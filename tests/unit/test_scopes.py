"""Which 403s mean "the grant lacks a scope", and which scope: Quota's word, else the route's."""

from __future__ import annotations

import json

import pytest

from sidecar.scopes import refused_scopes, scope_for_path


def quota_error(code: str, **extra: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": "…", **extra}}).encode()


@pytest.mark.parametrize(
    ("body", "www_authenticate", "path", "expected"),
    [
        (quota_error("insufficient_scope"), "", "/v1/chat/completions", ("credits.spend",)),
        (quota_error("insufficient_scope"), "", "/v1/messages", ("credits.spend",)),
        (quota_error("insufficient_scope"), "", "/v1beta/models/gemini:generate", ("credits.spend",)),
        (quota_error("insufficient_scope"), "", "/v1/audio/speech", ("credits.spend",)),
        (quota_error("insufficient_scope"), "", "/v1/models", ("credits.read",)),
        (quota_error("insufficient_scope"), "", "/v1/balance", ("credits.read",)),
        (quota_error("insufficient_scope", scope="credits.read"), "", "/v1/chat/completions",
         ("credits.read",)),
        (b"", 'Bearer realm="quota", error="insufficient_scope", scope="credits.spend"',
         "/v1/models", ("credits.spend",)),
        (b'{"error": "insufficient_scope"}', "", "/v1/models", ("credits.read",)),
        (quota_error("insufficient_scope", scope="<script> credits.read"), "", "/v1/models",
         ("credits.read",)),
        (quota_error("forbidden"), "", "/v1/chat/completions", None),
        (quota_error("insufficient_credits"), "", "/v1/chat/completions", None),
        (b"<html>403</html>", "", "/v1/chat/completions", None),
        (b"", 'Bearer realm="quota"', "/v1/chat/completions", None),
    ],
)  # fmt: skip
def test_refused_scopes_reads_quota_s_error_then_falls_back_to_the_route(
    body: bytes, www_authenticate: str, path: str, expected: tuple[str, ...] | None
) -> None:
    assert refused_scopes(body, www_authenticate, path) == expected


def test_the_balance_and_models_need_read_and_everything_else_spend() -> None:
    assert scope_for_path("/v1/models/gpt-4o-mini") == "credits.read"
    assert scope_for_path("/v1/modelsx") == "credits.spend"
    assert scope_for_path("/v1/responses") == "credits.spend"
