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

Client settings, the same for every topology, and why:

* ``socket_timeout`` / ``socket_connect_timeout`` 2 s: a hung or unreachable Redis becomes
  ``StoreUnavailable`` (503 with ``Retry-After``) instead of holding requests open.
* ``health_check_interval`` 30 s: a connection idle for longer is PINGed before use, so a
  connection broken while idle (Redis restarted, failover, NAT timeout) is replaced quietly.
* A small retry on connection errors only: ``REDIS_RETRIES`` extra attempts, jittered backoff
  capped at 250 ms. redis-py 8's default is 10 retries on errors *and* timeouts, which keeps a
  caller waiting for many seconds against a dead server (every timed-out attempt costs a full
  ``socket_timeout``). A retry on connection errors is what heals a stale pooled connection
  after a restart::

      t0  Redis restarts; the pool still holds a socket to the old process
      t1  command on the stale socket -> ConnectionError
      t1  retry: redis-py drops that socket, connects afresh, resends -> answer

  Measured with redis-py 8.1: a refused connection answers ``StoreUnavailable`` in ~0.2 s, a
  server that accepts but never answers in one ``socket_timeout`` (2 s), and once Redis is back
  the next command reconnects by itself. Timeouts are not retried: a server that did not answer
  in 2 s will rarely answer in the next 2, and the reply of a timed-out write may have been lost
  after the write happened. A retried write after a lost reply is harmless here anyway: a
  repeated ``put`` writes the same fields, and a repeated compare-and-set or compare-and-delete
  finds the version already changed and does nothing.

  The cluster client (redis-py 8.1) takes only the *number* of retries from this policy: it
  retries connection errors, timeouts and "cluster down" alike, each time after re-reading the
  cluster's layout (which is what follows a failover), without backoff. So a node that hangs
  costs up to ``1 + REDIS_RETRIES`` socket timeouts there (6 s), not one.
* A pool of ``REDIS_MAX_CONNECTIONS`` per process that *waits* (up to ``REDIS_POOL_WAIT_S``)
  when a burst needs more: redis-py 8's default pool of 100 fails at once with "Too many
  connections", so a storm of concurrent requests for one user would get 503s although Redis
  answers each command in microseconds. redis-py 8.1's cluster client has no waiting pool: it
  gets ``REDIS_CLUSTER_MAX_CONNECTIONS`` per node instead, and past that fails fast.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.redis_store import RedisTokenStore
from sidecar.tokens.store import TokenStore

REDIS_SOCKET_TIMEOUT_S = 2.0  # a hung Redis becomes a 503, not a stuck request
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_HEALTH_CHECK_INTERVAL_S = 30  # re-check connections idle longer than this before use
REDIS_RETRIES = 2  # enough to replace a stale pooled connection, few enough to fail fast
REDIS_RETRY_BACKOFF_BASE_S = 0.05
REDIS_RETRY_BACKOFF_CAP_S = 0.25
REDIS_MAX_CONNECTIONS = 100  # per process (and per server): redis-py's default pool size
REDIS_POOL_WAIT_S = 2.0  # a burst past the pool size waits this long for a free connection
REDIS_CLUSTER_MAX_CONNECTIONS = 1000  # per node: the cluster client cannot wait (see above)
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


def redis_retry() -> Retry:
    """The retry policy every Redis client of the sidecar uses (see the module docstring)."""
    return Retry(
        ExponentialWithJitterBackoff(
            base=REDIS_RETRY_BACKOFF_BASE_S, cap=REDIS_RETRY_BACKOFF_CAP_S
        ),
        retries=REDIS_RETRIES,
        supported_errors=(RedisConnectionError,),  # not TimeoutError: see the module docstring
    )


def _client_settings() -> dict[str, Any]:
    """Keyword arguments every Redis client and connection of the sidecar is built with."""
    return {
        "decode_responses": False,  # blobs are bytes
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL_S,
        "retry": redis_retry(),
    }


def _pool_settings() -> dict[str, Any]:
    return {"max_connections": REDIS_MAX_CONNECTIONS, "timeout": REDIS_POOL_WAIT_S}


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's connections, found through the sentinels, in a pool that waits when full.

    redis-py has a waiting pool and a Sentinel pool but no pool that is both; the two override
    disjoint methods (connection hand-out vs. master discovery), so they combine.
    """


def _check_standalone(url: str) -> None:
    try:
        parse_url(url)  # redis-py's own parser: its messages name an option, never a password
    except ValueError as exc:
        raise _form_error(str(exc).rstrip(".")) from None


def _standalone_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    _check_standalone(url)
    pool = aioredis.BlockingConnectionPool.from_url(url, **_pool_settings(), **_client_settings())
    return RedisTokenStore(aioredis.Redis.from_pool(pool), sealer, prefix=prefix)


def _parse_sentinel(url: str) -> tuple[_MultiHostUrl, str, int]:
    """The sentinels, the master's service name and the database number."""
    parsed = _parse_multi_host(url, "sentinel", SENTINEL_DEFAULT_PORT, extra=_SENTINEL_OPTIONS)
    service_name, db = _sentinel_path(parsed.path)
    if "sentinel_username" in parsed.options and "sentinel_password" not in parsed.options:
        raise _form_error("sentinel_username needs sentinel_password beside it")
    _tls_settings(parsed)
    return parsed, service_name, db


def _sentinel_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    parsed, service_name, db = _parse_sentinel(url)
    credentials: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    sentinel_credentials = credentials
    if "sentinel_password" in parsed.options:
        sentinel_credentials = {
            "username": parsed.options.get("sentinel_username"),
            "password": parsed.options["sentinel_password"],
        }
    tls = _tls_settings(parsed)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        parsed.hosts,
        # The sentinels' own clients: same timeouts and retry, their own credentials.
        sentinel_kwargs={**_client_settings(), **sentinel_credentials, **tls},
    )
    client: aioredis.Redis = sentinel.master_for(
        service_name,
        connection_pool_class=_BlockingSentinelPool,
        **_pool_settings(),
        **_client_settings(),
        **credentials,
        **tls,
        db=db,
    )
    # Closing the master's client leaves the sentinels' connections open: the store closes both.
    return RedisTokenStore(client, sealer, prefix=prefix, on_close=sentinel.aclose)


def _parse_cluster(url: str) -> _MultiHostUrl:
    parsed = _parse_multi_host(url, "cluster", CLUSTER_DEFAULT_PORT)
    if parsed.path.strip("/") not in ("", "0"):
        raise _form_error("a Redis Cluster has database 0 only; drop the path after the hosts")
    _tls_settings(parsed)
    return parsed


def _cluster_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    parsed = _parse_cluster(url)
    client = aioredis.RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        max_connections=REDIS_CLUSTER_MAX_CONNECTIONS,
        username=parsed.username,
        password=parsed.password,
        **_client_settings(),
        **_tls_settings(parsed),
    )
    return RedisTokenStore(client, sealer, prefix=prefix)


@dataclass(frozen=True, slots=True)
class _MultiHostUrl:
    """``scheme://[user:pass@]host[:port],host[:port]…/path?options``, taken apart."""

    tls: bool
    username: str | None
    password: str | None
    hosts: tuple[tuple[str, int], ...]
    path: str
    options: Mapping[str, str]

    def __repr__(self) -> str:  # never shows the password
        return f"_MultiHostUrl(tls={self.tls}, hosts={self.hosts}, path={self.path!r})"


def _parse_multi_host(
    url: str, kind: str, default_port: int, *, extra: tuple[str, ...] = ()
) -> _MultiHostUrl:
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
    return _MultiHostUrl(
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


def _tls_settings(parsed: _MultiHostUrl) -> dict[str, Any]:
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
