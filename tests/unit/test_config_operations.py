"""The operations keys: the admin listener, readiness's discovery check, shutdown timing."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config_loader import ConfigError, build_config

REQUIRED = {
    "quota": {"client_id": "quota_client_ops", "client_secret": "quota_secret_ops"},
    "session": {"secret": "s" * 40},
}


def build(env: dict[str, str] | None = None, **sections: dict[str, Any]) -> Any:
    doc: dict[str, dict[str, Any]] = {name: dict(values) for name, values in REQUIRED.items()}
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return build_config(doc, env or {})


def problems_of(**sections: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build(**sections)
    return caught.value.problems


def test_the_defaults_serve_admin_on_9090_and_drain_before_a_25_second_grace() -> None:
    config = build()
    assert config.listen.admin_address == "0.0.0.0:9090"
    assert config.quota.check_discovery_on_ready is False
    assert config.shutdown.drain_delay_s == 2.0
    assert config.shutdown.grace_s == 25.0


@pytest.mark.parametrize("value", ["off", "OFF", "", None, " off "])
def test_the_admin_listener_turns_off_with_off_or_empty(value: str | None) -> None:
    assert build(listen={"admin": value}).listen.admin_address is None


def test_the_admin_listener_turns_off_from_the_environment() -> None:
    config = build({"QUOTA_SIDECAR__LISTEN__ADMIN": "off"})
    assert config.listen.admin_address is None


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (
            {"admin": "9090"},
            "listen.admin: must be host:port such as 0.0.0.0:9090, or 'off' to turn it off; got '9090'",
        ),
        ({"admin": "0.0.0.0:8080"}, "listen.admin: port 8080 is already taken by listen.public"),
        (
            {"internal": "127.0.0.1:8080"},
            "listen.internal: port 8080 is already taken by listen.public",
        ),
    ],
)
def test_bad_admin_addresses_are_named(listen: dict[str, str], expected: str) -> None:
    assert expected in problems_of(listen=listen)


def test_port_zero_may_repeat_since_each_listener_gets_its_own() -> None:
    config = build(
        listen={"public": "127.0.0.1:0", "internal": "127.0.0.1:0", "admin": "127.0.0.1:0"}
    )
    assert config.listen.admin_address == "127.0.0.1:0"


def test_negative_shutdown_times_are_refused_each_by_name() -> None:
    problems = problems_of(shutdown={"drain_delay_s": -1, "grace_s": -0.5})
    assert "shutdown.drain_delay_s: must be 0 or more, got -1.0" in problems
    assert "shutdown.grace_s: must be 0 or more, got -0.5" in problems


def test_shutdown_and_discovery_keys_come_from_the_environment_too() -> None:
    config = build(
        {
            "QUOTA_SIDECAR__SHUTDOWN__GRACE_S": "5",
            "QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S": "0",
            "QUOTA_SIDECAR__QUOTA__CHECK_DISCOVERY_ON_READY": "true",
        }
    )
    assert config.shutdown.grace_s == 5.0
    assert config.shutdown.drain_delay_s == 0.0
    assert config.quota.check_discovery_on_ready is True
