"""Build the configured token store from its one-line spec (``memory`` or a Redis URL).

Accepted specs, chosen by the URL scheme::

    memory
    redis://[user:pass@]host:6379[/db]           standalone
    rediss://…?ssl_cert_reqs=…&ssl_ca_certs=…     standalone over TLS (redis-py's query options)
    unix:///path/to/redis.sock[?db=…]             standalone on a Unix socket
    redis+sentinel://[user:pass@]host:26379[,host:26379…]/service_name[/db]
    redis+cluster://[user:pass@]host:7000[,host:7001…][/]
    rediss+sentinel://…, rediss+cluster://…       the same over TLS

Sentinel: the sentinels are asked for the master of ``service_name``, and asked again after a
failover. The URL's user and password are the Redis server's, and the sentinels' too unless
``sentinel_password`` (and ``sentinel_username``) query parameters say otherwise. With
``rediss+sentinel`` both the sentinels and the master are reached over TLS.
Cluster: the listed nodes are only where discovery starts; the client learns the rest.
TLS options for the ``+sentinel`` and ``+cluster`` forms (query parameters, as for ``rediss``):
``ssl_cert_reqs`` (none, optional, required), ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_check_hostname``, ``ssl_ciphers``.

Construction does no network I/O: a Redis client connects on its first command (a cluster
client discovers its nodes then, a Sentinel client its master), so a sidecar starts (and
answers ``/readyz`` with "store unavailable") even while Redis is still coming up.

redis-py is imported only to check or build a Redis spec, never for ``memory``: the clients and
their settings (timeouts, retry, pool) are in ``sidecar.tokens.redis_clients``, and
``redis_store_of`` tells a Redis store apart without importing it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.store import TokenStore

if TYPE_CHECKING:
    from sidecar.tokens.redis_store import RedisTokenStore

SENTINEL_DEFAULT_PORT = 26379
CLUSTER_DEFAULT_PORT = 6379

ACCEPTED_FORMS = (
    "'memory', or a Redis URL: redis://host:6379/0, rediss://… (TLS), unix:///path.sock, "
    "redis+sentinel://[user:pass@]host:26379[,host:port…]/service_name[/db], "
    "redis+cluster://[user:pass@]host:7000[,host:port…] (rediss+sentinel://, rediss+cluster:// "
    "for TLS)"
)

# TLS query options both the Sentinel-managed and the cluster connections accept, and how to
# read each; checked here so a typo fails at start-up, not at the first connection.
_CERT_REQS = ("none", "optional", "required")
_TLS_OPTIONS: dict[str, Callable[[str], object]] = {
    "ssl_cert_reqs": lambda text: _one_of(text, _CERT_REQS),
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": lambda text: _boolean(text),
    "ssl_ciphers": str,
}
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


def create_store(spec: str, sealer: Sealer, *, prefix: str = "quota-sidecar") -> TokenStore:
    """The token store ``spec`` names. ``ValueError`` for a spec in no accepted form."""
    if spec == "memory":
        return MemoryTokenStore(sealer)
    return _form_of(spec).build(spec, sealer, prefix)


def redis_store_of(store: TokenStore) -> RedisTokenStore | None:
    """``store`` if it is a ``RedisTokenStore``, else ``None``.

    Asks the store's ``name`` first, so that a memory store is told apart without importing
    redis-py (``isinstance`` would need the class, and the class needs redis-py).
    """
    if store.name != "redis":
        return None
    from sidecar.tokens.redis_store import RedisTokenStore

    return store if isinstance(store, RedisTokenStore) else None


def check_store_spec(spec: str) -> None:
    """``ValueError``, with the message ``create_store`` would give, unless ``spec`` is accepted.

    Parses only: builds no client and connects nowhere, so configuration checks can call it.
    """
    if spec != "memory":
        _form_of(spec).check(spec)


def _form_of(spec: str) -> _Form:
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    form = _REDIS_FORMS.get(scheme)
    if form is None:
        # Say which scheme was refused, not the spec: a URL may carry a password.
        shown = (
            f"a {scheme}:// URL" if scheme.replace("+", "").isalnum() else "an unrecognised value"
        )
        raise ValueError(f"token store: got {shown}; expected {ACCEPTED_FORMS}")
    return form


def _check_standalone(url: str) -> None:
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)  # redis-py's own parser: its messages name an option, never a password
    except ValueError as exc:
        raise _form_error(str(exc).rstrip(".")) from None


def _standalone_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    _check_standalone(url)
    from sidecar.tokens import redis_clients

    return redis_clients.standalone_store(url, sealer, prefix)


def _parse_sentinel(url: str) -> tuple[MultiHostUrl, str, int]:
    """The sentinels, the master's service name and the database number."""
    parsed = _parse_multi_host(url, "sentinel", SENTINEL_DEFAULT_PORT, extra=_SENTINEL_OPTIONS)
    service_name, db = _sentinel_path(parsed.path)
    if "sentinel_username" in parsed.options and "sentinel_password" not in parsed.options:
        raise _form_error("sentinel_username needs sentinel_password beside it")
    _tls_settings(parsed)
    return parsed, service_name, db


def _sentinel_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    parsed, service_name, db = _parse_sentinel(url)
    from sidecar.tokens import redis_clients

    return redis_clients.sentinel_store(
        parsed, service_name, db, _tls_settings(parsed), sealer, prefix
    )


def _parse_cluster(url: str) -> MultiHostUrl:
    parsed = _parse_multi_host(url, "cluster", CLUSTER_DEFAULT_PORT)
    if parsed.path.strip("/") not in ("", "0"):
        raise _form_error("a Redis Cluster has database 0 only; drop the path after the hosts")
    _tls_settings(parsed)
    return parsed


def _cluster_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    parsed = _parse_cluster(url)
    from sidecar.tokens import redis_clients

    return redis_clients.cluster_store(parsed, _tls_settings(parsed), sealer, prefix)


@dataclass(frozen=True, slots=True)
class MultiHostUrl:
    """``scheme://[user:pass@]host[:port],host[:port]…/path?options``, taken apart."""

    tls: bool
    username: str | None
    password: str | None
    hosts: tuple[tuple[str, int], ...]
    path: str
    options: Mapping[str, str]

    def __repr__(self) -> str:  # never shows the password
        return f"MultiHostUrl(tls={self.tls}, hosts={self.hosts}, path={self.path!r})"


def _parse_multi_host(
    url: str, kind: str, default_port: int, *, extra: tuple[str, ...] = ()
) -> MultiHostUrl:
    """Take a ``redis[s]+<kind>://`` URL apart; ``ValueError`` naming the part that is wrong.

    Messages name a part (a host's position, an option's name), never the URL: it may hold a
    password, in the user part or in an option.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _form_error(f"the {kind} URL is malformed") from None
    if parts.fragment:
        raise _form_error(f"a {kind} URL has no #fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, has_password, password = userinfo.partition(":")
    hosts = tuple(
        _host_port(item, position, default_port)
        for position, item in enumerate(hostlist.split(","), start=1)
    )
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _TLS_OPTIONS and name not in extra:
            known = ", ".join((*extra, *_TLS_OPTIONS))
            raise _form_error(f"unknown option {name!r} in the {kind} URL (known: {known})")
        if name in options:
            raise _form_error(f"option {name!r} is given twice in the {kind} URL")
        options[name] = value
    return MultiHostUrl(
        tls=parts.scheme.lower().startswith("rediss+"),
        username=unquote(username) or None,
        password=unquote(password) if has_password and password else None,
        hosts=hosts,
        path=unquote(parts.path),
        options=options,
    )


def _host_port(item: str, position: int, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise _form_error(f"host #{position} is not host:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _form_error(f"host #{position} has an invalid IPv6 address") from None
    else:
        host, _, port_text = item.partition(":")
        if ":" in port_text:
            raise _form_error(f"host #{position}: write an IPv6 address in brackets, [::1]:7000")
    if not host:
        raise _form_error(f"host #{position} is empty")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _form_error(f"host #{position} has an invalid port")
    return host, int(port_text)


def _sentinel_path(path: str) -> tuple[str, int]:
    """``/service_name[/db]`` → the service name and the database number."""
    service_name, _, db_text = path.strip("/").partition("/")
    if not service_name:
        raise _form_error("a sentinel URL names the service after the hosts: …:26379/mymaster")
    if not db_text:
        return service_name, 0
    if not db_text.isdigit():
        raise _form_error("the database after the sentinel service name must be a number")
    return service_name, int(db_text)


def _tls_settings(parsed: MultiHostUrl) -> dict[str, Any]:
    tls_options = {name: value for name, value in parsed.options.items() if name in _TLS_OPTIONS}
    if not parsed.tls:
        if tls_options:
            raise _form_error(
                f"{', '.join(tls_options)} only apply to TLS: use rediss+sentinel:// or "
                "rediss+cluster://"
            )
        return {}
    settings: dict[str, Any] = {"ssl": True}
    for name, value in tls_options.items():
        try:
            settings[name] = _TLS_OPTIONS[name](value)
        except ValueError as exc:
            raise _form_error(f"option {name!r}: {exc}") from None
    return settings


def _one_of(text: str, choices: tuple[str, ...]) -> str:
    if text.lower() not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return text.lower()


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError("must be true or false")


def _form_error(problem: str) -> ValueError:
    return ValueError(f"token store: {problem}; expected {ACCEPTED_FORMS}")


class _Form(NamedTuple):
    check: Callable[[str], object]  # parse only; ``ValueError`` naming the problem
    build: Callable[[str, Sealer, str], TokenStore]


_STANDALONE = _Form(_check_standalone, _standalone_redis)
_SENTINEL = _Form(_parse_sentinel, _sentinel_redis)
_CLUSTER = _Form(_parse_cluster, _cluster_redis)
_REDIS_FORMS: dict[str, _Form] = {
    "redis": _STANDALONE,
    "rediss": _STANDALONE,
    "unix": _STANDALONE,
    "redis+sentinel": _SENTINEL,
    "rediss+sentinel": _SENTINEL,
    "redis+cluster": _CLUSTER,
    "rediss+cluster": _CLUSTER,
}
