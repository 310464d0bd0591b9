"""The metrics' building blocks: bounded labels, route classes, Quota's error codes."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from sidecar.metrics import CONNECT_ERRORS, REFRESH_OUTCOMES, BoundedLabel, Metrics, status_label
from sidecar.observe import error_code, route_class
from tests.scrape import parse


def test_a_bounded_label_passes_known_codes_admits_a_few_more_then_says_other() -> None:
    label = BoundedLabel({"access_denied"}, extra=2)
    assert label("access_denied") == "access_denied"
    assert label("new_one") == "new_one"
    assert label("new_two") == "new_two"
    assert label("new_three") == "other"
    assert label("new_one") == "new_one"  # admitted once, kept
    assert label("http_404") == "http_404"  # bounded by HTTP itself


@pytest.mark.parametrize("code", [None, "", "Has Caps", "x" * 49, "new\nline", "a-b"])
def test_a_bounded_label_turns_malformed_codes_into_other(code: str | None) -> None:
    assert BoundedLabel(set(), extra=100)(code) == "other"


@pytest.mark.parametrize(
    ("listener", "path", "route"),
    [
        ("public", "/auth/quota/connect", "auth"),
        ("public", "/v1/chat/completions", "proxy"),  # the app's own /v1, proxied
        ("public", "/", "proxy"),
        ("internal", "/v1/chat/completions", "v1"),
        ("internal", "/v1beta/models/x", "v1"),
        ("internal", "/auth/quota/status", "auth"),
        ("internal", "/elsewhere", "other"),
        ("admin", "/metrics", "admin"),
    ],
)
def test_every_path_falls_in_one_route_class(listener: str, path: str, route: str) -> None:
    assert route_class(listener, path) == route


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            b'{"error": {"code": "insufficient_credits", "message": "top up"}}',
            "insufficient_credits",
        ),
        (b'{"error": "invalid_grant"}', "invalid_grant"),
        (b'{"error": {"message": "no code"}}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
    ],
)
def test_quota_error_codes_are_read_from_either_error_shape(body: bytes, code: str | None) -> None:
    assert error_code(body) == code


def test_status_labels_are_http_codes_or_other() -> None:
    assert status_label(200) == "200"
    assert status_label(499) == "499"
    assert status_label(1000) == "other"


def test_fixed_label_sets_start_at_zero_so_alerts_have_a_series() -> None:
    scraped = parse(generate_latest(Metrics(process=False).registry).decode())
    for outcome in REFRESH_OUTCOMES:
        assert ("quota_sidecar_refreshes_total", outcome) in {
            (s.name, s.labels.get("outcome")) for s in scraped.samples
        }
    assert scraped.value("quota_sidecar_wallets_disconnected_total") == 0


def test_the_known_connect_errors_include_every_callback_failure_code() -> None:
    assert {"state_mismatch", "identity_changed", "token_exchange_failed"} <= CONNECT_ERRORS
