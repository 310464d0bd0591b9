"""The guards' counts kept in Redis, so the limits hold across every replica sharing it.

Layout, beside the user's tokens and in the same Cluster slot (the ``{user_key}`` hash tag)::

    <prefix>:{<user_key>}:streams               sorted set: member = call id, score = lease
                                                expiry (ms); the key expires with its last lease
    <prefix>:{<user_key>}:spend:<window start>  integer: credits spent in that window; expires
                                                when the window ends (plus a minute)

Admission is one script on both keys — spend check, then drop lapsed leases, count, add — so two
replicas cannot both take the last slot::

    replica A: EVALSHA admit → ZREMRANGEBYSCORE, ZCARD = 1 < 2, ZADD a   (one step on the server)
    replica B: EVALSHA admit → ZREMRANGEBYSCORE, ZCARD = 2 ≥ 2 → refused

Settlement is one script too (ZREM the lease, INCRBY the window). A replica renews its open
leases every third of ``stream_lease_ttl_s``; if it dies, they lapse on their own and the next
admission drops them. Call ids are random, never the client's ``X-Request-Id``, which may repeat.

A client that leaves while its admission is on the wire may leave a lease this replica never
learns it holds; nobody renews it, so it lapses within ``stream_lease_ttl_s`` like a dead
replica's.

Every Redis failure fails open (``sidecar.guards.base`` says why), counted by operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.commands.core import AsyncScript

from sidecar.guards.base import Limits, spend_limit_reached, too_many_streams, window_start
from sidecar.metrics import Metrics
from sidecar.tokens.redis_store import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)

# A spend counter outlives its window by this much, so a clock a little behind still finds it.
SPEND_KEY_SLACK_S = 60
# At shutdown, settlements still running get this long (each is one Redis command).
CLOSE_WAIT_S = 5.0
_REFUSED_SPEND, _REFUSED_STREAMS = 2, 1

# KEYS = streams, spend counter. ARGV = now (ms), lease expiry (ms), max streams (0: off),
# call id, streams key ttl (ms), spend limit (0: off). Returns {0 admitted | 1 streams | 2 spend,
# the count that decided}.
_ADMIT = """
local limit = tonumber(ARGV[6])
if limit > 0 then
  local spent = tonumber(redis.call('GET', KEYS[2]) or '0')
  if spent >= limit then
    return {2, spent}
  end
end
local most = tonumber(ARGV[3])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  local open = redis.call('ZCARD', KEYS[1])
  if open >= most then
    return {1, open}
  end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {0, open + 1}
end
return {0, 0}
"""

# KEYS = streams, spend counter. ARGV = call id ('' : no slot), credits, spend key ttl (ms).
_SETTLE = """
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local credits = tonumber(ARGV[2])
if credits > 0 then
  redis.call('INCRBY', KEYS[2], credits)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""

# KEYS = streams. ARGV = new lease expiry (ms), key ttl (ms), call ids… XX: a lease that already
# lapsed (and may have been dropped) is not brought back.
_RENEW = """
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisUserGuards:
    name = "redis"

    def __init__(
        self,
        client: RedisClient,
        limits: Limits,
        *,
        prefix: str,
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.limits = limits
        self._prefix = prefix
        self._clock = clock
        self._metrics = metrics
        self._admit: AsyncScript = client.register_script(_ADMIT)
        self._settle: AsyncScript = client.register_script(_SETTLE)
        self._renew: AsyncScript = client.register_script(_RENEW)
        self._ttl_ms = int(limits.lease_ttl_s * 1000)
        self._leases: dict[str, str] = {}  # call id -> user key, for this replica's renewals
        self._renewer: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()

    def streams_key(self, user_key: str) -> str:
        return f"{self._prefix}:{{{user_key}}}:streams"

    def spend_key(self, user_key: str, window: int) -> str:
        return f"{self._prefix}:{{{user_key}}}:spend:{window}"

    async def admit(self, user_key: str, call_id: str, *, billed: bool) -> bool:
        limits = self.limits
        spend_limit = limits.spend_limit if billed else 0
        if not spend_limit and not limits.max_streams:
            return False  # nothing to check: no round trip
        now = self._clock()
        window = window_start(now, limits.spend_period_s)
        now_ms = int(now * 1000)
        try:
            verdict, count = await self._admit(
                keys=[self.streams_key(user_key), self.spend_key(user_key, window)],
                args=[
                    now_ms,
                    now_ms + self._ttl_ms,
                    limits.max_streams,
                    call_id,
                    self._ttl_ms,
                    spend_limit,
                ],
            )
        except REDIS_ERRORS as exc:
            self._failed_open("admit", exc)
            return False
        if int(verdict) == _REFUSED_SPEND:
            self._metrics.guard_rejected("spend_limit_reached")
            raise spend_limit_reached(limits, int(count), now)
        if int(verdict) == _REFUSED_STREAMS:
            self._metrics.guard_rejected("too_many_streams")
            raise too_many_streams(limits, int(count))
        if not limits.max_streams:
            return False
        self._leases[call_id] = user_key
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="guard-lease-renewal")
        return True

    async def settle(self, user_key: str, call_id: str, *, slot: bool, credits_used: int) -> None:
        counted = credits_used > 0 and self.limits.spend_limit > 0
        if slot:
            self._leases.pop(call_id, None)  # stop renewing it now, whatever happens next
        if not slot and not counted:
            return
        # Shielded: a client that leaves cancels its handler, but its slot must still be freed.
        task = asyncio.create_task(
            self._settle_now(user_key, call_id if slot else "", credits_used if counted else 0)
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle_now(self, user_key: str, call_id: str, credits: int) -> None:
        now = self._clock()
        period = self.limits.spend_period_s
        window = window_start(now, period)
        spend_ttl_ms = int((window + period - now + SPEND_KEY_SLACK_S) * 1000)
        try:
            await self._settle(
                keys=[self.streams_key(user_key), self.spend_key(user_key, window)],
                args=[call_id, credits, spend_ttl_ms],
            )
        except REDIS_ERRORS as exc:
            self._failed_open("settle", exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.lease_ttl_s / 3)
            try:
                await self.renew()
            except Exception:  # a bug must not end the renewals: every open call would lapse
                log.exception("guards: renewing stream leases failed")

    async def renew(self) -> None:
        """Push back the expiry of every lease this replica holds (one script per user)."""
        by_user: dict[str, list[str]] = {}
        for call_id, user_key in self._leases.items():
            by_user.setdefault(user_key, []).append(call_id)
        if not by_user:
            return
        now_ms = int(self._clock() * 1000)
        results = await asyncio.gather(
            *(
                self._renew(
                    keys=[self.streams_key(user_key)],
                    args=[now_ms + self._ttl_ms, self._ttl_ms, *call_ids],
                )
                for user_key, call_ids in by_user.items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, REDIS_ERRORS):
                self._failed_open("renew", result)
            elif isinstance(result, BaseException):
                raise result

    def _failed_open(self, operation: str, exc: BaseException) -> None:
        self._metrics.guard_failed(operation)
        log.warning(
            "guards: Redis %s failed (%s: %s); the call goes on unguarded",
            operation,
            type(exc).__name__,
            exc,
        )

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=CLOSE_WAIT_S)
        self._leases.clear()
