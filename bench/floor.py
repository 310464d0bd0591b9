"""The aiohttp floor: the least an aiohttp forwarder can do per call, in its own process.

The same stack as the sidecar — aiohttp's server and its parsers, one pooled ``ClientSession``
to Quota, the answer streamed back chunk by chunk as it was framed, on asyncio's loop or on
uvloop — and nothing of the sidecar's own: no user, no token lookup, no middleware, no metrics,
no access log, no framing guard, no usage reading. It sends every request on with a fixed
bearer, as the nginx reference does. What a call costs here is the price of the stack; what the
sidecar spends beyond it is its own::

    handler ──► Quota (one pooled session, fixed bearer) ──► prepare ──► write each chunk ──► eof

Run: ``python bench/floor.py --port 18001 --upstream http://127.0.0.1:18000 [--loop uvloop]``;
it prints ``ready`` once it listens (loopback only) and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

FIXED_BEARER = "quota_token_floor_reference"  # the stub accepts any token
# What never crosses a proxy: hop-by-hop headers and the body's own framing (aiohttp sets it).
_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "authorization"}
)
HTTP = web.AppKey("http", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP)
    headers["Authorization"] = f"Bearer {FIXED_BEARER}"
    body = await request.read() if request.body_exists else None
    async with request.app[HTTP].request(
        request.method,
        request.app[UPSTREAM] + request.rel_url.raw_path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
    ) as upstream:
        out = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        content = upstream.content
        while True:
            chunk, _ = await content.readchunk()
            if not chunk:
                if content.at_eof():
                    break
                continue
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application) -> object:
        connector = aiohttp.TCPConnector(limit=4096)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as http:
            app[HTTP] = http
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(port: int, upstream: str) -> None:
    runner = web.AppRunner(create_app(upstream), access_log=None, handler_cancellation=True)
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


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Quota's base URL (the stub)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
