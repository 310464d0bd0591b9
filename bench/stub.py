"""A fast stand-in for Quota: just enough of its API to put load on a proxy, in its own process.

Unlike the emulator (``sidecar.mock_quota``) it checks nothing, bills nothing and keeps almost no
state, so that its own cost stays small and the same for every target it is measured through.

    POST /v1/chat/completions     a small fixed JSON answer (with a quota block, as Quota's
                                  billed answers carry); with ``"stream": true`` in the body
                                  (or the ``X-Bench-Stream`` header) an SSE answer of
                                  ``X-Bench-Events`` events (200), ``X-Bench-Gap-Ms`` apart (0)
                                  on a fixed schedule (at least half a gap apart),
                                  each written as its own HTTP chunk; with ``X-Bench-Hold-S`` the
                                  stream sends one event, then stays open that long (at most
                                  ``MAX_HOLD_S``) or until the client goes away
    GET  /oauth/authorize         approves at once: 302 to ``redirect_uri?code&state``; the
                                  bench's own ``ttl_s`` parameter sets the grant's token lifetime,
                                  and ``refresh_ttl_s`` (default: the same) that of the tokens
                                  its refreshes issue
    POST /oauth/token             both grants; the access token lives ``ttl_s`` seconds (carried
                                  inside the code and the refresh token); a refresh answers after
                                  ``--refresh-delay-ms``, like a real token endpoint's round-trip
    POST /oauth/revoke            200
    GET  /quota/whoami            the host app's identity probe: the ``bench_user`` cookie names
                                  the user in ``X-Quota-User``
    GET  /_bench/stats            calls counted since start (or since ``POST /_bench/reset``)

Run: ``python bench/stub.py --port 18000 [--refresh-delay-ms 50]``; it prints ``ready`` once it
listens (loopback only) and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
from collections import Counter
from urllib.parse import urlencode

from aiohttp import web

# The one plain answer, shared with the nginx front so every target returns the same bytes. It
# carries Quota's quota block, as every billed answer does, so the sidecar reads its usage.
CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_800_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench stub."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
        "quota": {
            "credits_used": 3,
            "balance_before": 1000,
            "balance_after": 997,
            "billing_mode": "user",
        },
    },
    separators=(",", ":"),
).encode()
DEFAULT_EVENTS = 200
MAX_EVENTS = 10_000
MAX_HOLD_S = 120.0
MAX_GAP_MS = 100.0
DEFAULT_TTL_S = 3600.0
COUNTS = web.AppKey("counts", Counter[str])
REFRESH_DELAY_S = web.AppKey("refresh_delay_s", float)
SCOPE = "credits.read credits.spend"


def sse_event(index: int) -> bytes:
    """Event ``index`` of a stream: one OpenAI ``chat.completion.chunk``, one word each."""
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": f"w{index} "}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def stream_bytes(events: int) -> bytes:
    """Everything a stream of ``events`` events carries, to compare what a client received."""
    return b"".join(sse_event(i) for i in range(events)) + DONE_EVENT


def _bounded(text: str | None, default: float, top: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return min(max(value, 0.0), top)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    counts = request.app[COUNTS]
    wants_stream = "X-Bench-Stream" in request.headers or (
        b'"stream":true' in body.replace(b" ", b"")
    )
    if not wants_stream:
        counts["chat"] += 1
        return web.Response(body=CHAT_JSON, content_type="application/json")
    counts["stream"] += 1
    events = int(_bounded(request.headers.get("X-Bench-Events"), DEFAULT_EVENTS, MAX_EVENTS))
    gap_s = _bounded(request.headers.get("X-Bench-Gap-Ms"), 0.0, MAX_GAP_MS) / 1000
    hold_s = _bounded(request.headers.get("X-Bench-Hold-S"), 0.0, MAX_HOLD_S)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    if hold_s:
        counts["held"] += 1
        await response.write(sse_event(0))
        await asyncio.sleep(hold_s)  # cancelled when the client goes away
        await response.write(DONE_EVENT)
        await response.write_eof()
        return response
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(events):
        await response.write(sse_event(index))  # each write is one HTTP chunk
        if gap_s:
            # On a fixed schedule, so a late wake-up does not push every later event back; yet
            # never less than half a gap apart, so catching up does not merge events on the wire.
            await asyncio.sleep(max(gap_s / 2, started + (index + 1) * gap_s - loop.time()))
    await response.write(DONE_EVENT)
    await response.write_eof()
    return response


async def authorize(request: web.Request) -> web.Response:
    query = request.query
    ttl_s = _bounded(query.get("ttl_s"), DEFAULT_TTL_S, 10 * DEFAULT_TTL_S)
    refresh_ttl_s = _bounded(query.get("refresh_ttl_s"), ttl_s, 10 * DEFAULT_TTL_S)
    request.app[COUNTS]["authorize"] += 1
    code = f"code_{ttl_s}-{refresh_ttl_s}_{secrets.token_hex(8)}"
    params = urlencode({"code": code, "state": query.get("state", "")})
    return web.Response(status=302, headers={"Location": f"{query['redirect_uri']}?{params}"})


def _ttls_of(grant: str) -> tuple[float, float]:
    """The lifetimes carried in ``code_<ttl>[-<refresh ttl>]_<rand>`` or
    ``quota_refresh_<ttl>_<rand>``: of the tokens this grant gives, and of those its refreshes
    give (the same unless the code says otherwise)."""
    parts = grant.rsplit("_", 2)
    first, _, then = (parts[-2] if len(parts) == 3 else "").partition("-")
    ttl_s = _bounded(first or None, DEFAULT_TTL_S, 10 * DEFAULT_TTL_S)
    return ttl_s, _bounded(then or None, ttl_s, 10 * DEFAULT_TTL_S)


async def token(request: web.Request) -> web.Response:
    form = await request.post()
    grant_type = str(form.get("grant_type", ""))
    counts = request.app[COUNTS]
    if grant_type == "refresh_token":
        counts["refresh"] += 1
        ttl_s, refresh_ttl_s = _ttls_of(str(form.get("refresh_token", "")))
        delay_s = request.app[REFRESH_DELAY_S]
        if delay_s:
            await asyncio.sleep(delay_s)
    elif grant_type == "authorization_code":
        counts["code"] += 1
        ttl_s, refresh_ttl_s = _ttls_of(str(form.get("code", "")))
    else:
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    return web.json_response(
        {
            "access_token": f"quota_token_{secrets.token_hex(16)}",
            "refresh_token": f"quota_refresh_{refresh_ttl_s}_{secrets.token_hex(16)}",
            "token_type": "Bearer",
            "expires_in": ttl_s,
            "scope": SCOPE,
        }
    )


async def revoke(request: web.Request) -> web.Response:
    request.app[COUNTS]["revoke"] += 1
    return web.Response()


async def whoami(request: web.Request) -> web.Response:
    user = request.cookies.get("bench_user")
    if not user:
        return web.json_response({"error": "not_signed_in"}, status=401)
    return web.json_response({"user": user}, headers={"X-Quota-User": user})


async def stats(request: web.Request) -> web.Response:
    counts = request.app[COUNTS]
    return web.json_response(dict(counts.items()))


async def reset(request: web.Request) -> web.Response:
    request.app[COUNTS].clear()
    return web.json_response({})


def create_app(*, refresh_delay_s: float = 0.0) -> web.Application:
    app = web.Application()
    app[COUNTS] = Counter()
    app[REFRESH_DELAY_S] = refresh_delay_s
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/oauth/authorize", authorize)
    app.router.add_post("/oauth/token", token)
    app.router.add_post("/oauth/revoke", revoke)
    app.router.add_get("/quota/whoami", whoami)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_post("/_bench/reset", reset)
    return app


async def serve(port: int, refresh_delay_s: float) -> None:
    runner = web.AppRunner(
        create_app(refresh_delay_s=refresh_delay_s),
        access_log=None,
        handler_cancellation=True,  # a held stream ends when its client goes away
        keepalive_timeout=300,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, shutdown_timeout=0.5)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--refresh-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.refresh_delay_ms / 1000))


if __name__ == "__main__":
    main()
