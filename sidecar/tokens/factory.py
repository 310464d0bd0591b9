"""Build the configured token store from its one-line spec (``memory`` or a Redis URL).

Construction does no network I/O: a Redis client connects on its first command, so a sidecar
starts (and answers ``/readyz`` with "store unavailable") even while Redis is still coming up.

Client settings, and why:

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

Sentinel and Cluster will be further entries in ``_REDIS_SCHEMES``'s dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
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

ACCEPTED_FORMS = "'memory', or a Redis URL: redis://…, rediss://… (TLS), unix://…"


def create_store(spec: str, sealer: Sealer, *, prefix: str = "quota-sidecar") -> TokenStore:
    """The token store ``spec`` names. ``ValueError`` for a spec in no accepted form."""
    if spec == "memory":
        return MemoryTokenStore(sealer)
    scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    build = _REDIS_SCHEMES.get(scheme)
    if build is None:
        # Say which scheme was refused, not the spec: a URL may carry a password.
        shown = f"a {scheme}:// URL" if scheme else "an unrecognised value"
        raise ValueError(f"token store: got {shown}; expected {ACCEPTED_FORMS}")
    return build(spec, sealer, prefix)


def redis_retry() -> Retry:
    """The retry policy every Redis client of the sidecar uses (see the module docstring)."""
    return Retry(
        ExponentialWithJitterBackoff(
            base=REDIS_RETRY_BACKOFF_BASE_S, cap=REDIS_RETRY_BACKOFF_CAP_S
        ),
        retries=REDIS_RETRIES,
        supported_errors=(RedisConnectionError,),  # not TimeoutError: see the module docstring
    )


def _standalone_redis(url: str, sealer: Sealer, prefix: str) -> TokenStore:
    client = aioredis.Redis.from_url(
        url,
        decode_responses=False,  # blobs are bytes
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=REDIS_HEALTH_CHECK_INTERVAL_S,
        retry=redis_retry(),
    )
    return RedisTokenStore(client, sealer, prefix=prefix)


_REDIS_SCHEMES: dict[str, Callable[[str, Sealer, str], TokenStore]] = {
    "redis": _standalone_redis,
    "rediss": _standalone_redis,
    "unix": _standalone_redis,
}
