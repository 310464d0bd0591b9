"""The Redis token store's redis-py client for each topology, with the sidecar's settings.

``sidecar.tokens.factory`` parses the spec and imports this module only for a Redis store, so a
sidecar with the memory store never loads redis-py (about 7.5 MB of resident memory).

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

from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.tokens.crypto import Sealer
from sidecar.tokens.redis_store import RedisTokenStore

if TYPE_CHECKING:
    from sidecar.tokens.factory import MultiHostUrl

REDIS_SOCKET_TIMEOUT_S = 2.0  # a hung Redis becomes a 503, not a stuck request
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_HEALTH_CHECK_INTERVAL_S = 30  # re-check connections idle longer than this before use
REDIS_RETRIES = 2  # enough to replace a stale pooled connection, few enough to fail fast
REDIS_RETRY_BACKOFF_BASE_S = 0.05
REDIS_RETRY_BACKOFF_CAP_S = 0.25
REDIS_MAX_CONNECTIONS = 100  # per process (and per server): redis-py's default pool size
REDIS_POOL_WAIT_S = 2.0  # a burst past the pool size waits this long for a free connection
REDIS_CLUSTER_MAX_CONNECTIONS = 1000  # per node: the cluster client cannot wait (see above)


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


def standalone_store(url: str, sealer: Sealer, prefix: str) -> RedisTokenStore:
    """A standalone server (``redis://``, ``rediss://``, ``unix://``); ``url`` already checked."""
    pool = aioredis.BlockingConnectionPool.from_url(url, **_pool_settings(), **_client_settings())
    return RedisTokenStore(aioredis.Redis.from_pool(pool), sealer, prefix=prefix)


def sentinel_store(
    parsed: MultiHostUrl,
    service_name: str,
    db: int,
    tls: dict[str, Any],
    sealer: Sealer,
    prefix: str,
) -> RedisTokenStore:
    """The master of ``service_name``, found through the sentinels in ``parsed``."""
    credentials: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    sentinel_credentials = credentials
    if "sentinel_password" in parsed.options:
        sentinel_credentials = {
            "username": parsed.options.get("sentinel_username"),
            "password": parsed.options["sentinel_password"],
        }
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


def cluster_store(
    parsed: MultiHostUrl, tls: dict[str, Any], sealer: Sealer, prefix: str
) -> RedisTokenStore:
    """A cluster, discovered from the nodes in ``parsed``."""
    client = aioredis.RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        max_connections=REDIS_CLUSTER_MAX_CONNECTIONS,
        username=parsed.username,
        password=parsed.password,
        **_client_settings(),
        **tls,
    )
    return RedisTokenStore(client, sealer, prefix=prefix)
