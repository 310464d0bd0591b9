"""The URL a /v1 call goes to is Quota's base plus the request's own path, or nothing at all."""

from __future__ import annotations

import pytest

from sidecar.errors import InvalidPath
from sidecar.forwarding.quota import quota_url

BASE = "http://quota.test:8080/api/"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/chat/completions",  # not a forwarded prefix
        "/v1//evil.example/x",
        "/v1/a\\b",
        "/v1/%2fevil.example/x",
        "/v1/%2Fevil.example/x",
        "/v1/a%5cb",
        "/v1/a%5Cb",
        "/v1/../x",
        "/v1/%2e%2E/x",
        "/v1/./models",
        "/v1beta/..",
        "/v1/a b",
        "/v1/a\tb",
        "/v1/a\x00b",
        "/v1/a\x1fb",
        "/v1/a\x7fb",
    ],
)
def test_a_path_that_could_leave_quota_or_be_read_two_ways_is_refused(path: str) -> None:
    with pytest.raises(InvalidPath):
        quota_url(BASE, path, "")


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/v1/chat/completions", "", "http://quota.test:8080/api/v1/chat/completions"),
        ("/v1/models", "limit=5", "http://quota.test:8080/api/v1/models?limit=5"),
        (
            "/v1beta/models/gemini-1.5-pro:generateContent",
            "",
            "http://quota.test:8080/api/v1beta/models/gemini-1.5-pro:generateContent",
        ),
        ("/v1/files/a.b..c", "", "http://quota.test:8080/api/v1/files/a.b..c"),
        ("/v1/files/caf%C3%A9", "", "http://quota.test:8080/api/v1/files/caf%C3%A9"),
    ],
)
def test_other_paths_are_appended_to_the_base_as_they_came(
    path: str, query: str, expected: str
) -> None:
    assert str(quota_url(BASE, path, query)) == expected
