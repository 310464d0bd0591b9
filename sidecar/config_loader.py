"""Load the configuration: YAML, ``${VAR}`` interpolation, environment overrides, one error.

Order: the YAML document → ``${VAR}`` / ``${VAR:-default}`` interpolation in its strings →
environment overrides (the recipe's names such as ``QUOTA_CLIENT_ID``, then the generic
``QUOTA_SIDECAR__SECTION__KEY``) → unknown keys rejected → values converted → cross-field checks.
Every problem found on the way is collected and raised as one ``ConfigError`` that lists each with
its key path. No network I/O and no global state: reachability is checked at start-up.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from sidecar import config as c
from sidecar.secret import Secret
from sidecar.tokens.factory import check_store_spec

DEFAULT_CONFIG_PATH = Path("config/sidecar.yaml")
GENERIC_ENV_PREFIX = "QUOTA_SIDECAR__"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_RESERVED_HEADERS = frozenset(
    {"authorization", "cookie", "host", "connection", "content-length", "transfer-encoding"}
)


class ConfigError(Exception):
    """Every problem in one configuration, each starting with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"configuration has {len(problems)} problem(s):\n{lines}")


def resolve_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: ``--config``, else ``QUOTA_SIDECAR_CONFIG``, else the default if present."""
    if explicit:
        return Path(explicit)
    if env.get("QUOTA_SIDECAR_CONFIG"):
        return Path(env["QUOTA_SIDECAR_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> c.Config:
    env = dict(os.environ) if env is None else env
    problems: list[str] = []
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read the config file ({exc.strerror})"]) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({_yaml_where(exc)})"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"])
        doc = _interpolate(loaded, env, "", problems)
    return build_config(doc, env, problems)


def build_config(
    doc: Mapping[str, Any], env: Mapping[str, str], problems: list[str] | None = None
) -> c.Config:
    """Turn an already-parsed document plus the environment into a validated ``Config``."""
    problems = [] if problems is None else problems
    merged: dict[str, dict[str, Any]] = {}
    for section, value in doc.items():
        if section not in c.SECTIONS:
            problems.append(f"{section}: unknown section (known: {', '.join(c.SECTIONS)})")
        elif value is None:
            merged[section] = {}
        elif not isinstance(value, dict):
            problems.append(f"{section}: must be a mapping of keys, got {_kind(value)}")
        else:
            merged[section] = dict(value)
    _apply_env(merged, env, problems)

    sections: dict[str, Any] = {}
    for name, cls in c.SECTIONS.items():
        sections[name] = _build_section(name, cls, merged.get(name, {}), problems)
    sections["tokens"] = _default_wait_skew(sections["tokens"], merged.get("tokens", {}))
    config = c.Config(**sections)
    # Check values even when some are missing or malformed (placeholders stand in), so that one
    # run reports everything; keep the first problem per key path.
    _check(config, problems)
    if problems:
        raise ConfigError(_first_per_key(problems))
    return config


def _default_wait_skew(tokens: c.TokensConfig, given: Mapping[str, Any]) -> c.TokensConfig:
    """An unset ``tokens.refresh_wait_skew_s`` is at most ``tokens.refresh_skew_s``: a config
    that only lowered the refresh skew (say to 1 s) keeps loading, and its callers keep waiting
    for every refresh as they did before the wait skew existed."""
    if "refresh_wait_skew_s" in given or tokens.refresh_wait_skew_s <= tokens.refresh_skew_s:
        return tokens
    return dataclasses.replace(tokens, refresh_wait_skew_s=max(tokens.refresh_skew_s, 0.0))


def _first_per_key(problems: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for problem in problems:
        key = problem.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def _interpolate(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        if default is not None:
            return default
        problems.append(
            f"{path}: refers to ${{{name}}}, which is not set (or use ${{{name}:-default}})"
        )
        return ""

    return _VAR.sub(sub, value)


def _apply_env(
    merged: dict[str, dict[str, Any]], env: Mapping[str, str], problems: list[str]
) -> None:
    for var, (section, key) in c.ENV_ALIASES.items():
        if env.get(var):
            merged.setdefault(section, {})[key] = env[var]
    for var, value in env.items():
        if not var.startswith(GENERIC_ENV_PREFIX):
            continue
        parts = var[len(GENERIC_ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in c.SECTIONS:
            problems.append(f"{var}: not a config key (use {GENERIC_ENV_PREFIX}<SECTION>__<KEY>)")
            continue
        merged.setdefault(parts[0], {})[parts[1]] = value


def _build_section(name: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        path = f"{name}.{fname}"
        if fname in values:
            ok, converted = _convert(values[fname], hints[fname], path, problems)
            if ok:
                kwargs[fname] = converted
        if fname not in kwargs and f.default is dataclasses.MISSING:
            if fname not in values:
                problems.append(f"{path}: required; {_how_to_set(name, fname)}")
            kwargs[fname] = Secret("") if hints[fname] is Secret else ""  # placeholder
    return cls(**kwargs)


def _how_to_set(section: str, key: str) -> str:
    for var, target in c.ENV_ALIASES.items():
        if target == (section, key):
            return f"set {var} or {section}.{key} in the config file"
    return f"set {section}.{key} in the config file"


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        # YAML reads a bare `off`/`no`/`false` as False: for an optional value that means "none".
        if (
            value is None
            or value is False
            or (isinstance(value, str) and value.strip() in ("", "null", "~"))
        ):
            return True, None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path, problems)
    if origin is Literal:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text in args:
            return True, text
        problems.append(f"{path}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return False, None
    if origin is tuple:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list):
            problems.append(f"{path}: must be a list, got {_kind(value)}")
            return False, None
        out = []
        for i, item in enumerate(items):
            ok, conv = _convert(item, args[0], f"{path}[{i}]", problems)
            if not ok:
                return False, None
            out.append(conv)
        return True, tuple(out)
    if hint is Secret:
        if isinstance(value, str | int) and not isinstance(value, bool):
            return True, Secret(str(value))
    elif hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return True, str(value)
    elif hint is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return True, value.lower() in ("true", "1", "yes")
    elif hint in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = hint(value)
        except (TypeError, ValueError):
            pass
        else:
            return True, number
    name = getattr(hint, "__name__", str(hint))
    problems.append(f"{path}: must be {_article(name)}, got {_kind(value)} {_show(value, hint)}")
    return False, None


def _check(config: c.Config, problems: list[str]) -> None:
    q, s, t, u, ident, r = (
        config.quota,
        config.session,
        config.tokens,
        config.upstream,
        config.identity,
        config.redirects,
    )
    _check_url("quota.base_url", q.base_url, problems)
    _check_url("upstream.url", u.url, problems)
    if q.redirect_uri is not None:
        _check_url("quota.redirect_uri", q.redirect_uri, problems)
    if not q.client_id.strip():
        problems.append("quota.client_id: must not be empty; set QUOTA_CLIENT_ID")
    if not q.client_secret:
        problems.append("quota.client_secret: must not be empty; set QUOTA_CLIENT_SECRET")
    if not q.scopes:
        problems.append(
            "quota.scopes: must name at least one scope, e.g. credits.read credits.spend"
        )
    for scope in q.scopes:
        if scope not in c.KNOWN_SCOPES:
            problems.append(
                f"quota.scopes: unknown scope {scope!r} (known: {', '.join(sorted(c.KNOWN_SCOPES))})"
            )
    if len(s.secret) < c.MIN_SESSION_SECRET_LENGTH:
        problems.append(
            f"session.secret: must be at least {c.MIN_SESSION_SECRET_LENGTH} characters, got "
            f"{len(s.secret)}; generate one with `quota-sidecar gen-secret`"
        )
    for i, net in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"session.trusted_proxies[{i}]: {net!r} is not an IP address or CIDR")
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", s.cookie_name):
        problems.append("session.cookie_name: use 1-64 letters, digits, '_' or '-'")
    for listener, address in (
        ("public", config.listen.public),
        ("internal", config.listen.internal),
    ):
        _check_listen(f"listen.{listener}", address, problems)
    _check_admin_and_shutdown(config, problems)
    host = (
        split_host_port(config.listen.internal)[0] if _listen_ok(config.listen.internal) else None
    )
    if host is not None and not is_loopback_host(host) and ident.internal_api_key is None:
        problems.append(
            f"listen.internal: binds to {host}, off loopback, so any peer could spend users' wallets; "
            "set identity.internal_api_key (QUOTA_INTERNAL_API_KEY) or bind to 127.0.0.1"
        )
    if ident.internal_api_key is not None and len(ident.internal_api_key) < 24:
        problems.append("identity.internal_api_key: must be at least 24 characters")
    if not _HEADER_NAME.match(ident.header) or ident.header.lower() in _RESERVED_HEADERS:
        problems.append(
            f"identity.header: {ident.header!r} is not usable; pick a plain header name such as X-Quota-User"
        )
    if not 1 <= ident.max_length <= 4096:
        problems.append("identity.max_length: must be between 1 and 4096")
    if not u.identity_probe_path.startswith("/") or u.identity_probe_path.startswith("//"):
        problems.append("upstream.identity_probe_path: must be a path starting with a single '/'")
    try:
        check_store_spec(t.store)
    except ValueError as exc:
        problems.append(f"tokens.store: {exc}")
    for i, key in enumerate(t.encryption_keys):
        if decode_key(key) is None:
            problems.append(
                f"tokens.encryption_keys[{i}]: must be 32 bytes in base64url; generate one with "
                "`quota-sidecar gen-secret`"
            )
    if not re.fullmatch(r"[A-Za-z0-9_\-.]{1,64}", t.key_prefix):
        problems.append("tokens.key_prefix: use 1-64 letters, digits, '_', '-' or '.'")
    for name, amount in (
        ("quota.timeout_s", q.timeout_s),
        ("quota.connect_timeout_s", q.connect_timeout_s),
        ("quota.stream_idle_timeout_s", q.stream_idle_timeout_s),
        ("quota.first_byte_timeout_s", q.first_byte_timeout_s),
        ("upstream.probe_timeout_s", u.probe_timeout_s),
        ("upstream.connect_timeout_s", u.connect_timeout_s),
        ("upstream.idle_timeout_s", u.idle_timeout_s),
        ("upstream.first_byte_timeout_s", u.first_byte_timeout_s),
        ("tokens.lock_ttl_s", t.lock_ttl_s),
        ("session.pending_ttl_s", s.pending_ttl_s),
    ):
        if amount <= 0:
            problems.append(f"{name}: must be greater than 0, got {amount}")
    lim = config.limits
    for name, count in (
        ("limits.max_header_size_bytes", lim.max_header_size_bytes),
        ("limits.max_header_count", lim.max_header_count),
        ("limits.keepalive_timeout_s", lim.keepalive_timeout_s),
        ("limits.header_timeout_s", lim.header_timeout_s),
        ("limits.body_idle_timeout_s", lim.body_idle_timeout_s),
        ("limits.backlog", lim.backlog),
    ):
        if count <= 0:
            problems.append(f"{name}: must be greater than 0, got {count}")
    for name, count in (
        ("limits.max_body_bytes", lim.max_body_bytes),
        ("limits.max_v1_body_bytes", lim.max_v1_body_bytes),
        ("limits.pool_size", lim.pool_size),
    ):
        if count < 0:
            problems.append(f"{name}: must be 0 (no limit) or more, got {count}")
    if q.replay_max_bytes < 0:
        problems.append(f"quota.replay_max_bytes: must be 0 or more, got {q.replay_max_bytes}")
    if t.refresh_skew_s < 0:
        problems.append(f"tokens.refresh_skew_s: must be 0 or more, got {t.refresh_skew_s}")
    wait_s = t.refresh_wait_skew_s
    if not wait_s >= 0:  # not "< 0": nan is refused too
        problems.append(f"tokens.refresh_wait_skew_s: must be 0 or more, got {wait_s}")
    elif wait_s > t.refresh_skew_s:
        problems.append(
            "tokens.refresh_wait_skew_s: must be at most tokens.refresh_skew_s "
            f"({t.refresh_skew_s}), got {wait_s}"
        )
    if t.cache_ttl_s < 0:
        problems.append(f"tokens.cache_ttl_s: must be 0 or more, got {t.cache_ttl_s}")
    for name, value in (
        ("redirects.after_connect", r.after_connect),
        ("redirects.after_error", r.after_error),
    ):
        if not is_local_path(value):
            problems.append(f"{name}: must be a path on this site starting with '/', got {value!r}")
    if r.login_url is not None and not is_local_path(r.login_url):
        _check_url("redirects.login_url", r.login_url, problems)
    _check_events_and_topup(config, problems)
    _check_guards(config.guards, problems)
    _check_webhooks(config.webhooks, problems)


def _check_webhooks(w: c.WebhooksConfig, problems: list[str]) -> None:
    if w.secret is not None and not w.secret.reveal().startswith("whsec_"):
        problems.append(
            "webhooks.secret: must be the whsec_… signing secret Quota shows for the webhook; "
            "set QUOTA_WEBHOOK_SECRET"
        )
    if w.max_age_s <= 0:
        problems.append(f"webhooks.max_age_s: must be greater than 0, got {w.max_age_s}")
    if w.replay_window_s < w.max_age_s + c.WEBHOOK_FUTURE_SKEW_S:
        problems.append(
            "webhooks.replay_window_s: must be at least webhooks.max_age_s + "
            f"{c.WEBHOOK_FUTURE_SKEW_S} ({w.max_age_s + c.WEBHOOK_FUTURE_SKEW_S}), or an event "
            f"could be replayed once its id is forgotten; got {w.replay_window_s}"
        )


def _check_events_and_topup(config: c.Config, problems: list[str]) -> None:
    ev, top = config.events, config.topup
    if ev.url is not None:
        _check_url("events.url", ev.url, problems)
        if ev.secret is None:
            problems.append(
                "events.secret: required when events.url is set; set QUOTA_SIDECAR_EVENTS_SECRET "
                "(generate one with `quota-sidecar gen-secret`)"
            )
    if ev.secret is not None and len(ev.secret) < c.MIN_EVENTS_SECRET_LENGTH:
        problems.append(
            f"events.secret: must be at least {c.MIN_EVENTS_SECRET_LENGTH} characters, got "
            f"{len(ev.secret)}; generate one with `quota-sidecar gen-secret`"
        )
    for name, amount in (
        ("events.timeout_s", ev.timeout_s),
        ("events.backoff_base_s", ev.backoff_base_s),
        ("events.max_attempts", ev.max_attempts),
        ("events.queue_size", ev.queue_size),
    ):
        if amount <= 0:
            problems.append(f"{name}: must be greater than 0, got {amount}")
    if ev.backoff_max_s < ev.backoff_base_s:
        problems.append(
            f"events.backoff_max_s: must be at least events.backoff_base_s ({ev.backoff_base_s}), "
            f"got {ev.backoff_max_s}"
        )
    if ev.flush_timeout_s < 0:
        problems.append(f"events.flush_timeout_s: must be 0 or more, got {ev.flush_timeout_s}")
    for name, value in (
        ("topup.success_path", top.success_path),
        ("topup.cancel_path", top.cancel_path),
    ):
        if not is_local_path(value):
            problems.append(f"{name}: must be a path on this site starting with '/', got {value!r}")
    if top.public_url is not None:
        _check_url("topup.public_url", top.public_url, problems)
        if urlsplit(top.public_url).path not in ("", "/"):
            problems.append(
                "topup.public_url: must be the app's origin only, such as https://app.example.com, "
                f"got {top.public_url!r}"
            )


def _check_guards(g: c.GuardsConfig, problems: list[str]) -> None:
    for name, count in (
        ("guards.max_concurrent_streams_per_user", g.max_concurrent_streams_per_user),
        ("guards.spend_limit_credits", g.spend_limit_credits),
    ):
        if count < 0:
            problems.append(f"{name}: must be 0 (no limit) or more, got {count}")
    if g.spend_period_s <= 0:
        problems.append(f"guards.spend_period_s: must be greater than 0, got {g.spend_period_s}")
    if g.stream_lease_ttl_s < 1:
        problems.append(
            f"guards.stream_lease_ttl_s: must be at least 1 (second), got {g.stream_lease_ttl_s}"
        )


def _check_url(name: str, value: str, problems: list[str]) -> None:
    """An absolute http(s) URL; a path prefix is fine (e.g. behind a gateway), a query is not."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        problems.append(f"{name}: has an invalid port, got {value!r}")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{name}: must be an absolute http(s) URL, got {value!r}")
    elif parts.query or parts.fragment:
        problems.append(f"{name}: must not carry a query or fragment, got {value!r}")


def _listen_ok(value: str) -> bool:
    try:
        split_host_port(value)
    except ValueError:
        return False
    return True


def _check_listen(name: str, value: str, problems: list[str]) -> None:
    try:
        split_host_port(value)
    except ValueError as exc:
        problems.append(f"{name}: {exc}")


def _check_admin_and_shutdown(config: c.Config, problems: list[str]) -> None:
    listen, shutdown = config.listen, config.shutdown
    admin = listen.admin_address
    if admin is not None and not _listen_ok(admin):
        problems.append(
            "listen.admin: must be host:port such as 0.0.0.0:9090, or 'off' to turn it off; "
            f"got {admin!r}"
        )
    ports: dict[int, str] = {}
    for name, address in (
        ("public", listen.public),
        ("internal", listen.internal),
        ("admin", admin),
    ):
        if address is None or not _listen_ok(address):
            continue
        port = split_host_port(address)[1]
        if port and port in ports:
            problems.append(f"listen.{name}: port {port} is already taken by listen.{ports[port]}")
        ports.setdefault(port, name)
    for name, amount in (
        ("shutdown.drain_delay_s", shutdown.drain_delay_s),
        ("shutdown.grace_s", shutdown.grace_s),
    ):
        if amount < 0:
            problems.append(f"{name}: must be 0 or more, got {amount}")


def split_host_port(value: str) -> tuple[str, int]:
    """``"0.0.0.0:8080"`` or ``"[::1]:8081"`` → host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port such as 127.0.0.1:8081, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {value!r}")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_path(value: str) -> bool:
    """A same-origin relative path: starts with one '/', no scheme, no backslash, no control chars."""
    return (
        value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
    )


def decode_key(key: Secret) -> bytes | None:
    text = key.reveal().strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else str(problem)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any, hint: Any) -> str:
    return "" if hint is Secret else f"({value!r})"


def _article(name: str) -> str:
    return {
        "str": "a string",
        "int": "a whole number",
        "float": "a number",
        "bool": "true or false",
        "Secret": "a string",
    }.get(name, name)


def masked(config: c.Config) -> dict[str, Any]:
    """The effective configuration as plain data, every secret shown as ``***``."""

    def conv(value: Any) -> Any:
        if isinstance(value, Secret):
            return "***"
        if isinstance(value, tuple):
            return [conv(v) for v in value]
        return value

    return {
        name: {
            f.name: conv(getattr(getattr(config, name), f.name)) for f in dataclasses.fields(cls)
        }
        for name, cls in c.SECTIONS.items()
    }
