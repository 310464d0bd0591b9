"""Configuration: one error listing every problem, each with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config_loader import ConfigError, build_config, load_config, masked

GOOD_ENV = {
    "QUOTA_CLIENT_ID": "quota_client_x",
    "QUOTA_CLIENT_SECRET": "quota_secret_y",
    "SESSION_SECRET": "z" * 32,
}


def problems_of(doc: dict, env: dict[str, str]) -> list[str]:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as caught:
        build_config(doc, env)
    return caught.value.problems


def test_three_variables_are_all_a_config_needs() -> None:
    config = build_config({}, GOOD_ENV)
    assert config.quota.base_url == "https://api.usequota.ai"
    assert config.quota.scopes == ("credits.read", "credits.spend")
    assert config.tokens.store == "memory"
    assert config.listen.internal == "127.0.0.1:8081"
    assert config.quota.redirect_uri is None


def test_check_config_lists_missing_vars_bad_url_unknown_key_and_short_secret_and_exits_1(
    tmp_path: Path,
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "quota:\n  base_url: ftp://nowhere\n  colour: blue\nsession:\n  secret: short\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    err = result.stderr
    assert "configuration has 5 problem(s)" in err
    assert "quota.client_id: required; set QUOTA_CLIENT_ID" in err
    assert "quota.client_secret: required; set QUOTA_CLIENT_SECRET" in err
    assert "quota.base_url: must be an absolute http(s) URL, got 'ftp://nowhere'" in err
    assert "quota.colour: unknown key" in err
    assert "session.secret: must be at least 32 characters, got 5" in err
    assert "short" not in err.replace("got 5", "")  # the secret's value is never echoed


def test_one_error_lists_missing_vars_bad_url_unknown_key_and_short_secret(tmp_path: Path) -> None:
    """The four problems of the issue, in one document, in one error."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "quota:\n  client_id: ${QUOTA_CLIENT_ID}\n  base_url: not-a-url\n  colour: blue\n"
        "session:\n  secret: short\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    text = str(caught.value)
    assert "quota.client_id: refers to ${QUOTA_CLIENT_ID}, which is not set" in text
    assert "quota.client_secret: required" in text
    assert "quota.colour: unknown key" in text
    assert "quota.base_url: must be an absolute http(s) URL" in text
    assert "session.secret: must be at least 32 characters" in text


def test_interpolation_uses_the_environment_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "quota:\n  base_url: ${QUOTA_URL:-http://127.0.0.1:5181}\n"
        "tokens:\n  store: ${STORE:-memory}\n  refresh_skew_s: ${SKEW}\n"
    )
    loaded = load_config(config, {**GOOD_ENV, "SKEW": "45"})
    assert loaded.quota.base_url == "http://127.0.0.1:5181"
    assert loaded.tokens.refresh_skew_s == 45.0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("quota:\n  client_id: from-file\ntokens:\n  lock_ttl_s: 3\n")
    loaded = load_config(
        config,
        {**GOOD_ENV, "REDIS_URL": "redis://r:6379/0", "QUOTA_SIDECAR__TOKENS__LOCK_TTL_S": "7"},
    )
    assert loaded.quota.client_id == "quota_client_x"
    assert loaded.tokens.store == "redis://r:6379/0"
    assert loaded.tokens.lock_ttl_s == 7.0


def test_callers_wait_for_a_refresh_only_in_the_last_five_seconds_by_default() -> None:
    tokens = build_config({}, GOOD_ENV).tokens
    assert (tokens.refresh_skew_s, tokens.refresh_wait_skew_s) == (30.0, 5.0)


def test_the_wait_skew_can_be_set_from_the_environment() -> None:
    env = {**GOOD_ENV, "QUOTA_SIDECAR__TOKENS__REFRESH_WAIT_SKEW_S": "12.5"}
    assert build_config({}, env).tokens.refresh_wait_skew_s == 12.5


@pytest.mark.parametrize("skew", [0, 1, 4.5])
def test_an_unset_wait_skew_follows_a_refresh_skew_set_below_it(skew: float) -> None:
    """A config that lowered only the refresh skew still loads, with every caller waiting."""
    tokens = build_config({"tokens": {"refresh_skew_s": skew}}, GOOD_ENV).tokens
    assert tokens.refresh_wait_skew_s == skew


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (
            {"refresh_wait_skew_s": -1},
            "tokens.refresh_wait_skew_s: must be 0 or more, got -1.0",
        ),
        (
            {"refresh_wait_skew_s": "nan"},
            "tokens.refresh_wait_skew_s: must be 0 or more, got nan",
        ),
        (
            {"refresh_wait_skew_s": 31},
            "tokens.refresh_wait_skew_s: must be at most tokens.refresh_skew_s (30.0), got 31.0",
        ),
        (
            {"refresh_skew_s": 1, "refresh_wait_skew_s": 5},
            "tokens.refresh_wait_skew_s: must be at most tokens.refresh_skew_s (1.0), got 5.0",
        ),
    ],
)
def test_a_wait_skew_outside_zero_to_the_refresh_skew_is_refused(
    tokens: dict[str, object], expected: str
) -> None:
    assert expected in problems_of({"tokens": tokens}, GOOD_ENV)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"listen": {"internal": "0.0.0.0:8081"}},
            "listen.internal: binds to 0.0.0.0, off loopback",
        ),
        ({"listen": {"public": "8080"}}, "listen.public: must be host:port"),
        (
            {"tokens": {"store": "mysql://x"}},
            "tokens.store: token store: got a mysql:// URL; expected 'memory'",
        ),
        ({"tokens": {"encryption_keys": ["short"]}}, "tokens.encryption_keys[0]: must be 32 bytes"),
        ({"tokens": {"refresh_skew_s": "soon"}}, "tokens.refresh_skew_s: must be a number"),
        (
            {"session": {"secure": "sometimes"}},
            "session.secure: must be one of auto, always, never",
        ),
        ({"session": {"trusted_proxies": ["10.0.0.0/8", "nope"]}}, "session.trusted_proxies[1]"),
        (
            {"quota": {"scopes": "credits.read wallet.drain"}},
            "quota.scopes: unknown scope 'wallet.drain'",
        ),
        (
            {"redirects": {"after_connect": "https://evil.example"}},
            "redirects.after_connect: must be a path",
        ),
        ({"identity": {"header": "Cookie"}}, "identity.header: 'Cookie' is not usable"),
        ({"upstream": {"url": "http://app:3000?x=1"}}, "upstream.url: must not carry a query"),
        ({"limits": {"backlog": 0}}, "limits.backlog: must be greater than 0, got 0"),
        ({"colours": {}}, "colours: unknown section"),
        ({"quota": "x"}, "quota: must be a mapping"),
    ],
)
def test_each_bad_value_is_named_by_its_key_path(doc: dict, expected: str) -> None:  # type: ignore[type-arg]
    assert any(expected in p for p in problems_of(doc, GOOD_ENV)), problems_of(doc, GOOD_ENV)


def test_internal_listener_off_loopback_is_allowed_with_an_api_key() -> None:
    config = build_config(
        {"listen": {"internal": "0.0.0.0:8081"}, "identity": {"internal_api_key": "k" * 32}},
        GOOD_ENV,
    )
    assert config.listen.internal == "0.0.0.0:8081"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("quota:\n  client_id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column"):
        load_config(config, GOOD_ENV)


def test_masked_config_shows_no_secret() -> None:
    config = build_config(
        {"identity": {"internal_api_key": "k" * 32}, "tokens": {"encryption_keys": ["A" * 43]}},
        GOOD_ENV,
    )
    text = repr(masked(config)) + repr(config)
    for secret in ("quota_secret_y", "z" * 32, "k" * 32, "A" * 43):
        assert secret not in text


def test_check_config_prints_the_effective_config_masked(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **GOOD_ENV},
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "client_secret: '***'" in result.stdout
    assert "quota_secret_y" not in result.stdout
    assert "z" * 32 not in result.stdout


def test_a_bare_yaml_off_turns_the_admin_listener_off(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen:\n  admin: off\n")
    assert load_config(config, GOOD_ENV).listen.admin_address is None
