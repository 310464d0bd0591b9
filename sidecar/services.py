"""The long-lived objects both listeners share, made once at start-up and closed at shutdown.

Made here: the HTTP client sessions (one connection pool per target, Quota and the host app, each
with a traced session for every call and an untraced one the forwarders account for), the
token store, the keys derived from ``SESSION_SECRET``, the Quota client and the token manager,
and the host-app event sink (``sidecar.hooks``), whose delivery runs from start-up until shutdown
has flushed it (after the listeners closed, so events of the last requests still go out).
Tests pass their own clock or store through ``open_services``; nothing here is a module-level
singleton.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from sidecar import observe
from sidecar.config import Config
from sidecar.config_loader import decode_key
from sidecar.forwarding.headers import Network, parse_networks
from sidecar.guards import UserGuards, create_guards
from sidecar.hooks import EventSink, create_sink, user_resolver
from sidecar.metrics import Metrics
from sidecar.oauth import QuotaClient
from sidecar.tokens.cache import ChangeNotices, RecordCache
from sidecar.tokens.counted import CountedStore
from sidecar.tokens.crypto import Sealer, UserKeys, derive_key
from sidecar.tokens.factory import create_store, redis_store_of
from sidecar.tokens.manager import RefreshCoordinator, TokenManager
from sidecar.tokens.memory import MemoryTokenStore
from sidecar.tokens.store import TokenStore
from sidecar.wire_times import TimedResponse, timed_connector

if TYPE_CHECKING:
    from sidecar.tokens.lock import RedisRefreshCoordinator

log = logging.getLogger(__name__)

SEAL_LABEL = "quota-sidecar/v1/token-seal"
USER_KEY_LABEL = "quota-sidecar/v1/user-key"
COOKIE_LABEL = "quota-sidecar/v1/session-cookie"


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    clock: Callable[[], float]
    quota_http: aiohttp.ClientSession
    upstream_http: aiohttp.ClientSession
    # The forwarders' sessions: the same pools, no trace (they account their calls themselves).
    quota_forward: observe.ObservedSession
    upstream_forward: observe.ObservedSession
    quota: QuotaClient
    tokens: TokenManager
    user_keys: UserKeys
    cookie_key: bytes
    trusted_proxies: tuple[Network, ...]
    metrics: Metrics = field(default_factory=Metrics)
    # Host-app events (sidecar.hooks); the silent sink unless events.url is set.
    events: EventSink = field(default_factory=EventSink)
    # Per-user guards (sidecar.guards); None while every guard is off.
    guards: UserGuards | None = None

    def user_key(self, user_id: str) -> str:
        return self.user_keys.key_for(user_id)


SERVICES = web.AppKey("services", Services)


def make_sealer(config: Config) -> Sealer:
    """The key ring: configured keys first (the first seals), then the key derived from
    ``session.secret``, which only opens once keys are configured — so moving from the default
    to explicit keys is a rotation like any other (``rotate-keys`` re-seals under the first)."""
    derived = derive_key(config.session.secret.reveal().encode(), SEAL_LABEL)
    keys = [k for k in (decode_key(s) for s in config.tokens.encryption_keys) if k is not None]
    return Sealer([*keys, derived] if derived not in keys else keys)


def _client_session(
    connector: aiohttp.BaseConnector, *, owner: bool, trace: aiohttp.TraceConfig | None = None
) -> aiohttp.ClientSession:
    # No total timeout on the session: streams may last; each call sets its own timeouts.
    return aiohttp.ClientSession(
        connector=connector,
        connector_owner=owner,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[trace] if trace is not None else None,
        response_class=TimedResponse,  # the wait for the remote, as the connection saw it
    )


def _sessions(
    limit: int, calls: observe.OutgoingCalls
) -> tuple[aiohttp.ClientSession, observe.ObservedSession]:
    """One pool for a target: a traced session for every call, an untraced one to forward."""
    connector = timed_connector(limit=limit, ttl_dns_cache=60, enable_cleanup_closed=True)
    traced = _client_session(connector, owner=True, trace=observe.client_trace(calls))
    return traced, observe.ObservedSession(_client_session(connector, owner=False), calls)


@contextlib.asynccontextmanager
async def open_services(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    store: TokenStore | None = None,
    coordinator: RefreshCoordinator | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Services]:
    secret = config.session.secret.reveal().encode()
    metrics = metrics or Metrics()
    token_store = store or create_store(
        config.tokens.store, make_sealer(config), prefix=config.tokens.key_prefix
    )
    if token_store.name == "memory":
        log.warning(
            "token store is in memory: tokens live in this one process and are lost on restart; "
            "set REDIS_URL to run more than one replica"
        )
    redis_coordinator: RedisRefreshCoordinator | None = None
    redis_store = redis_store_of(token_store)
    if coordinator is None and redis_store is not None:
        from sidecar.tokens.lock import RedisRefreshCoordinator  # imports redis-py

        redis_coordinator = coordinator = RedisRefreshCoordinator(
            redis_store,
            lock_ttl_s=config.tokens.lock_ttl_s,
            # A holder renews its lease while Quota answers; wait for it as long as that may take.
            max_wait_s=config.quota.timeout_s + 2 * config.tokens.lock_ttl_s,
            metrics=metrics,
        )
        redis_coordinator.start()
    quota_http, quota_forward = _sessions(
        config.limits.pool_size,
        observe.OutgoingCalls(
            observe.quota_call(config.quota.base_url),
            metrics.quota_duration,
            metrics.quota_errors,
        ),
    )
    upstream_http, upstream_forward = _sessions(
        config.limits.pool_size,
        observe.OutgoingCalls(
            observe.app_call(config.upstream.url, config.upstream.identity_probe_path),
            metrics.app_duration,
            metrics.app_errors,
        ),
    )
    events = create_sink(
        config.events, metrics=metrics, clock=clock, resolve_user=user_resolver(token_store)
    )
    guards = create_guards(config.guards, token_store, clock=clock, metrics=metrics)
    tokens: TokenManager | None = None
    try:
        quota = QuotaClient(quota_http, config.quota, clock=clock)
        # Opened records kept between calls: dropped by the Redis coordinator's change notices,
        # or by the memory store itself on every write (sidecar.tokens.cache).
        notices: ChangeNotices | None = redis_coordinator
        if notices is None and isinstance(token_store, MemoryTokenStore):
            notices = token_store
        cache = None
        if notices is not None and config.tokens.cache_ttl_s > 0:
            cache = RecordCache(
                notices,
                ttl_s=config.tokens.cache_ttl_s,
                wait_skew_s=config.tokens.refresh_wait_skew_s,
            )
        tokens = TokenManager(
            CountedStore(token_store, metrics),
            quota,
            refresh_skew_s=config.tokens.refresh_skew_s,
            refresh_wait_skew_s=config.tokens.refresh_wait_skew_s,
            clock=clock,
            coordinator=coordinator,
            metrics=metrics,
            cache=cache,
        )
        await events.start()
        yield Services(
            config=config,
            clock=clock,
            quota_http=quota_http,
            upstream_http=upstream_http,
            quota_forward=quota_forward,
            upstream_forward=upstream_forward,
            quota=quota,
            tokens=tokens,
            user_keys=UserKeys(derive_key(secret, USER_KEY_LABEL)),
            cookie_key=derive_key(secret, COOKIE_LABEL),
            trusted_proxies=parse_networks(config.session.trusted_proxies),
            metrics=metrics,
            events=events,
            guards=guards,
        )
    finally:
        if tokens is not None:
            await tokens.close()  # refreshes and status notes still running, before the store
        if guards is not None:
            await guards.close()  # before the store: they share its Redis client
        await events.close()  # bounded by events.flush_timeout_s
        if redis_coordinator is not None:
            await redis_coordinator.close()
        await quota_forward.http.close()
        await upstream_forward.http.close()
        await quota_http.close()  # and the pools they share
        await upstream_http.close()
        await token_store.close()
