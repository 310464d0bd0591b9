"""The demo host app: everything a web app in any language has to do to use quota-sidecar.

A host app keeps its own sign-in and adds two things, nothing more:

1. **An identity endpoint.** ``GET /quota/whoami`` answers 200 with ``X-Quota-User: <user id>``
   when the request's cookie belongs to a signed-in user, and 401 otherwise. The sidecar calls it
   with the browser's ``Cookie`` to learn who is connecting a wallet.
2. **One header on its AI calls.** The backend sends OpenAI-compatible requests to the sidecar's
   internal listener with ``X-Quota-User: <user id>`` (and ``Authorization: Bearer <key>`` when the
   sidecar has an internal API key). The sidecar adds that user's Quota token.

The browser side is a link to ``/auth/quota/connect`` and same-origin ``fetch`` calls to
``/auth/quota/status``, ``/balance`` and ``/disconnect``, which the sidecar serves in front of the
app; when the wallet runs low, links to ``/auth/quota/topup?package=…`` (the packages come from
``/auth/quota/packages``). No OAuth code, no token storage, no Quota SDK.

Optionally, an events endpoint: with ``events_secret`` set, ``POST /quota/events`` takes the
sidecar's signed events (``events.url``), checks each signature with
``sidecar.hooks.verify_signature``, logs it and keeps the last few, which the page lists for the
user they concern (``GET /api/events``).

The rest is demo furniture: sign-in by name (any name; an HMAC-signed cookie), one page, and
``POST /api/chat``, which streams the sidecar's SSE answer through to the browser as it arrives.

User ids: an HTTP header carries visible ASCII, and the sidecar rejects anything else, so the id in
the header is the name percent-encoded (``ada`` stays ``ada``, ``Ada Lovelace`` becomes
``Ada%20Lovelace``). A real app sends its own stable user id here instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.hooks import SIGNATURE_HEADER, verify_signature

log = logging.getLogger(__name__)

COOKIE_NAME: Final = "demo_user"
CHAT_MODEL: Final = "gpt-4o-mini"
MAX_NAME_CHARS: Final = 64
MAX_MESSAGE_CHARS: Final = 4000
# No total timeout: an answer may stream for minutes. The sidecar is local, so a connection that
# takes longer than this means it is down.
CONNECT_TIMEOUT_S: Final = 5.0
# The longest silence we wait for between two chunks (a slow model thinking before its first token).
READ_TIMEOUT_S: Final = 120.0
# Error bodies are small JSON; a larger one is not relayed as-is.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
# Events are small JSON; the page shows a user the few latest of theirs.
MAX_EVENT_BODY_BYTES: Final = 64 * 1024
KEPT_EVENTS: Final = 50
SHOWN_EVENTS: Final = 5
# Sidecar headers the browser may use on a relayed error (the top-up hint on a 402).
_RELAYED_ERROR_HEADERS: Final = ("Retry-After", "X-Quota-Topup-Url")

# The cookie key is derived from the secret under its own label, so passing the sidecar's
# SESSION_SECRET here does not reuse the sidecar's keys.
_COOKIE_KEY_LABEL: Final = b"quota-sidecar demo host app: user cookie v1"
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SLOT = re.compile(r"\{\{(\w+)\}\}")
_NO_STORE: Final = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class _Pages:
    """The page's parts, read once from ``static/`` and put together per request."""

    shell: str
    style: str
    script: str
    signed_out: str
    signed_in: str

    @classmethod
    def load(cls) -> _Pages:
        static = resources.files("sidecar.demo") / "static"

        def read(name: str) -> str:
            return (static / name).read_text(encoding="utf-8")

        return cls(
            shell=read("page.html"),
            style=read("page.css"),
            script=read("page.js"),
            signed_out=read("signed_out.html"),
            signed_in=read("signed_in.html"),
        )

    def render(self, user: str | None, nonce: str) -> str:
        if user is None:
            main = self.signed_out
        else:
            main = _fill(self.signed_in, {"user": html.escape(user)})
        values = {"main": main, "style": self.style, "script": self.script, "nonce": nonce}
        return _fill(self.shell, values)


@dataclass(frozen=True, slots=True)
class _Settings:
    chat_url: str
    identity_header: str
    internal_api_key: str | None
    cookie_key: bytes
    pages: _Pages
    events_secret: str | None = None


SETTINGS_KEY: Final = web.AppKey("demo_settings", _Settings)


class _EventLog:
    """The latest events the sidecar delivered, newest last (in memory: a demo needs no more)."""

    def __init__(self) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)


EVENTS_KEY: Final = web.AppKey("demo_events", _EventLog)
HTTP_KEY: Final = web.AppKey("demo_http", aiohttp.ClientSession)


def create_host_app(
    *,
    internal_url: str,
    identity_header: str = "X-Quota-User",
    internal_api_key: str | None = None,
    cookie_secret: bytes | None = None,
    events_secret: str | None = None,
) -> web.Application:
    """Build the demo app; ``internal_url`` is the sidecar's internal listener.

    ``events_secret`` (the sidecar's ``events.secret``) turns on ``POST /quota/events``.
    """
    if not _HEADER_TOKEN.fullmatch(identity_header):
        raise ValueError(f"identity_header {identity_header!r} is not a valid HTTP header name")
    if cookie_secret is not None and not cookie_secret:
        raise ValueError("cookie_secret must not be empty; pass None for a random per-process key")
    secret = cookie_secret if cookie_secret is not None else secrets.token_bytes(32)
    app = web.Application(middlewares=[_refuse_cross_site_posts])
    app[SETTINGS_KEY] = _Settings(
        chat_url=internal_url.rstrip("/") + "/v1/chat/completions",
        identity_header=identity_header,
        internal_api_key=internal_api_key or None,
        cookie_key=hmac.new(secret, _COOKIE_KEY_LABEL, hashlib.sha256).digest(),
        pages=_Pages.load(),
        events_secret=events_secret or None,
    )
    app[EVENTS_KEY] = _EventLog()
    app.cleanup_ctx.append(_http_client)
    app.router.add_get("/", _index)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/quota/whoami", _whoami)
    app.router.add_post("/api/chat", _chat)
    app.router.add_get("/api/events", _recent_events)
    if events_secret:
        app.router.add_post("/quota/events", _receive_event)
    return app


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )
    # One session serves every user: it must never carry one user's cookies into another's call.
    async with aiohttp.ClientSession(
        timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[HTTP_KEY] = session
        yield


@web.middleware
async def _refuse_cross_site_posts(request: web.Request, handler: Handler) -> web.StreamResponse:
    # SameSite=Lax keeps the cookie off cross-site POSTs; this also stops login CSRF.
    if request.method == "POST" and request.headers.get("Sec-Fetch-Site") == "cross-site":
        return _json_error(403, "forbidden_origin", "Cross-site requests are not accepted.")
    return await handler(request)


# --- the two things a host app adds ---------------------------------------------------------


async def _whoami(request: web.Request) -> web.Response:
    """The identity endpoint the sidecar probes with the browser's cookie."""
    settings = request.app[SETTINGS_KEY]
    name = _signed_in_user(request, settings)
    if name is None:
        return web.json_response({"error": "not_signed_in"}, status=401, headers=_NO_STORE)
    headers = {**_NO_STORE, settings.identity_header: user_id(name)}
    return web.json_response({"user": name}, headers=headers)


async def _chat(request: web.Request) -> web.StreamResponse:
    """Ask the sidecar for a streamed answer on the user's behalf and relay it as it comes."""
    settings = request.app[SETTINGS_KEY]
    name = _signed_in_user(request, settings)
    if name is None:
        return _json_error(401, "not_signed_in", "Sign in first.")
    message = await _read_message(request)
    if message is None:
        return _json_error(
            400,
            "invalid_message",
            f'Send JSON {{"message": "..."}} with 1 to {MAX_MESSAGE_CHARS} characters.',
        )
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        settings.identity_header: user_id(name),
    }
    if settings.internal_api_key:
        headers["Authorization"] = f"Bearer {settings.internal_api_key}"
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": message}],
        "stream": True,
    }
    try:
        upstream = await request.app[HTTP_KEY].post(
            settings.chat_url,
            data=json.dumps(body).encode(),
            headers=headers,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("sidecar unreachable at %s: %r", settings.chat_url, exc)
        return _sidecar_unavailable()
    async with upstream:
        if not 200 <= upstream.status < 300:
            return await _relay_error(upstream)
        return await _relay_stream(request, upstream)


async def _relay_error(upstream: aiohttp.ClientResponse) -> web.Response:
    """Hand the sidecar's (or Quota's) error to the browser with its status, body unchanged."""
    body = bytearray()
    try:
        async for chunk in upstream.content.iter_chunked(8192):
            body += chunk
            if len(body) > MAX_ERROR_BODY_BYTES:
                break
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("sidecar error body cut off: %r", exc)
        return _sidecar_unavailable()
    headers = {
        name: upstream.headers[name] for name in _RELAYED_ERROR_HEADERS if name in upstream.headers
    }
    if len(body) <= MAX_ERROR_BODY_BYTES and _is_json_object(body):
        return web.Response(
            body=bytes(body),
            status=upstream.status,
            content_type="application/json",
            headers=headers,
        )
    log.warning("sidecar answered %d without a JSON error body", upstream.status)
    return _json_error(
        upstream.status,
        "sidecar_error",
        f"The wallet connector answered HTTP {upstream.status}.",
        headers=headers,
    )


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Write each chunk to the browser as it arrives; nothing is held back or buffered whole."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # tell nginx-like proxies in front not to buffer either
        }
    )
    await response.prepare(request)
    chunks = upstream.content.iter_any()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is gone already: end the stream with an event the page can show.
            # The blank line first closes any event the cut left half-written.
            log.warning("answer stream from the sidecar cut off: %r", exc)
            error = {
                "error": {
                    "code": "sidecar_unavailable",
                    "message": "The answer was cut off before it finished.",
                }
            }
            try:
                await response.write(b"\n\ndata: " + json.dumps(error).encode() + b"\n\n")
            except ConnectionResetError:
                return response
            break
        try:
            await response.write(chunk)
        except ConnectionResetError:
            # The browser went away; leaving `async with upstream` closes the sidecar call too.
            log.info("browser left during an answer stream")
            return response
    await response.write_eof()
    return response


async def _read_message(request: web.Request) -> str | None:
    try:
        payload = await request.json()
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    message = payload.get("message")
    if not isinstance(message, str):
        return None
    message = message.strip()
    if not 1 <= len(message) <= MAX_MESSAGE_CHARS:
        return None
    return message


# --- optional: events from the sidecar ----------------------------------------------------------


async def _receive_event(request: web.Request) -> web.Response:
    """``events.url``: check the signature on the raw body first, then keep the event."""
    settings = request.app[SETTINGS_KEY]
    assert settings.events_secret is not None  # the route exists only with a secret
    body = await request.content.read(MAX_EVENT_BODY_BYTES + 1)
    header = request.headers.get(SIGNATURE_HEADER)
    if len(body) > MAX_EVENT_BODY_BYTES or not verify_signature(
        settings.events_secret, header, body, now=time.time()
    ):
        log.warning("refused an event whose signature does not check out")
        return _json_error(401, "invalid_signature", "The event signature does not check out.")
    try:
        event = json.loads(body)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return _json_error(400, "invalid_event", "An event is a JSON object with a type.")
    log.info("event %s %s for %s", event.get("id"), event["type"], event.get("user"))
    request.app[EVENTS_KEY].events.append(event)
    return web.Response(status=204)


async def _recent_events(request: web.Request) -> web.Response:
    """The signed-in user's latest events, newest first: only their own."""
    settings = request.app[SETTINGS_KEY]
    name = _signed_in_user(request, settings)
    if name is None:
        return _json_error(401, "not_signed_in", "Sign in first.")
    if settings.events_secret is None:
        return _json_error(404, "events_off", "This demo was started without events.")
    me = user_id(name)
    mine = [e for e in reversed(request.app[EVENTS_KEY].events) if e.get("user") == me]
    shown = [
        {k: e.get(k) for k in ("id", "type", "created_at", "data")} for e in mine[:SHOWN_EVENTS]
    ]
    return web.json_response({"events": shown}, headers=_NO_STORE)


# --- demo sign-in -------------------------------------------------------------------------------


async def _index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    nonce = secrets.token_urlsafe(16)
    page = settings.pages.render(_signed_in_user(request, settings), nonce)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        **_NO_STORE,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    return web.Response(text=page, content_type="text/html", headers=headers)


async def _login(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    form = await request.post()
    raw = form.get("name")
    name = raw.strip() if isinstance(raw, str) else ""
    if not _valid_name(name):
        return _see_other("/?signin_error=invalid_name")
    response = _see_other("/")
    response.set_cookie(
        COOKIE_NAME,
        _seal(settings.cookie_key, name),
        path="/",
        httponly=True,
        samesite="Lax",
        secure=request.secure,
    )
    return response


async def _logout(request: web.Request) -> web.Response:
    response = _see_other("/")
    response.del_cookie(COOKIE_NAME, path="/", httponly=True, samesite="Lax")
    return response


def user_id(name: str) -> str:
    """The id sent in the identity header: the name, percent-encoded to visible ASCII."""
    return quote(name, safe="@")


def _valid_name(name: str) -> bool:
    return 1 <= len(name) <= MAX_NAME_CHARS and name.isprintable()


def _signed_in_user(request: web.Request, settings: _Settings) -> str | None:
    """The name in a valid signed cookie; a missing, tampered or malformed cookie means nobody."""
    raw = request.cookies.get(COOKIE_NAME)
    if not raw:
        return None
    return _open(settings.cookie_key, raw)


def _seal(key: bytes, name: str) -> str:
    payload = _b64encode(name.encode("utf-8"))
    return f"{payload}.{_mac(key, payload)}"


def _open(key: bytes, sealed: str) -> str | None:
    payload, dot, mac = sealed.partition(".")
    if not dot or not hmac.compare_digest(mac.encode(), _mac(key, payload).encode()):
        return None
    try:
        name = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return name if _valid_name(name) else None


def _mac(key: bytes, payload: str) -> str:
    return _b64encode(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- small helpers ------------------------------------------------------------------------------


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{{name}}`` slots in one pass, so inserted text is never scanned for slots."""
    return _SLOT.sub(lambda m: values.get(m[1], m[0]), template)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _is_json_object(body: bytes | bytearray) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _json_error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "type": "demo_app_error"}}
    return web.json_response(body, status=status, headers=headers)


def _sidecar_unavailable() -> web.Response:
    return _json_error(
        502,
        "sidecar_unavailable",
        "The Quota wallet connector (the sidecar) is not reachable. Try again in a moment.",
    )
