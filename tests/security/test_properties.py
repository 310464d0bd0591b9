"""Property-based: whatever arrives, the answer is a defined error or a success — never a 500.

A real sidecar (with the emulator and a stub app) runs on a background event loop for the
module; hypothesis then throws callback query strings, header values and config documents at it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import Sidecar
from sidecar.config_loader import ConfigError, build_config
from sidecar.mock_quota import MockQuota, create_app
from sidecar.services import open_services
from tests.support import create_stub_upstream, make_config

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Running:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.public = self.internal = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        quota = MockQuota()
        runners = []
        for app in (create_app(quota), create_stub_upstream().app):
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
        quota_url, upstream_url = (f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners)
        client = quota.register_client(
            name="Props", redirect_uris=["http://app/auth/quota/callback"]
        )
        config = make_config(
            quota={
                "base_url": quota_url,
                "client_id": client.client_id,
                "client_secret": client.client_secret,
            },
            upstream={"url": upstream_url},
            listen={"public": "127.0.0.1:0", "internal": "127.0.0.1:0"},
            log={"level": "error"},
        )
        async with open_services(config) as services:
            sidecar = Sidecar(services)
            await sidecar.start()
            self.public = sidecar.urls["public"].removeprefix("http://")
            self.internal = sidecar.urls["internal"].removeprefix("http://")
            self.ready.set()
            await self.stop.wait()
            await sidecar.stop()
        for runner in runners:
            await runner.cleanup()


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    r = Running()
    r.thread.start()
    assert r.ready.wait(20), "the sidecar did not start"
    yield r
    r.loop.call_soon_threadsafe(r.stop.set)
    r.thread.join(20)


def raw_request(
    hostport: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    host, port = hostport.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:  # refused outright
        return 400, repr(exc).encode()
    finally:
        conn.close()


query_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80).map(
    lambda s: quote(s, safe="")
)


@SETTINGS
@given(code=query_text, state=query_text, error=st.one_of(st.none(), query_text), junk=query_text)
def test_any_callback_query_ends_in_a_redirect_with_a_stable_code(
    running: Running, code: str, state: str, error: str | None, junk: str
) -> None:
    parts = [f"code={code}", f"state={state}", junk]
    if error is not None:
        parts.append(f"error={error}")
    status, body = raw_request(running.public, "/auth/quota/callback?" + "&".join(parts))
    assert status == 302, body[:200]


@SETTINGS
@given(raw=st.binary(max_size=60))
def test_any_bytes_in_the_query_string_never_give_a_500(running: Running, raw: bytes) -> None:
    target = "/auth/quota/callback?" + raw.decode("latin-1").replace(" ", "%20").replace("#", "%23")
    if any(ch in target for ch in "\r\n\x00") or any(
        ord(ch) < 0x20 or ord(ch) > 0x7E for ch in target
    ):
        target = "/auth/quota/callback?" + quote(raw, safe="=&")
    status, _ = raw_request(running.public, target)
    assert status in (302, 400)


header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=300,
)


@SETTINGS
@given(identity=header_value, other=header_value)
def test_any_identity_header_on_the_internal_listener_gets_a_defined_answer(
    running: Running, identity: str, other: str
) -> None:
    status, body = raw_request(
        running.internal,
        "/v1/models",
        {"X-Quota-User": identity, "X-Other": other, "Authorization": other},
    )
    assert status in (400, 401), body[:200]
    if body.startswith(b"{"):
        assert json.loads(body)["error"]["code"] in (
            "identity_missing",
            "identity_invalid",
            "wallet_not_connected",
        )


@SETTINGS
@given(cookie=header_value, identity=header_value)
def test_any_cookie_or_spoofed_identity_on_the_public_listener_names_no_one(
    running: Running, cookie: str, identity: str
) -> None:
    status, body = raw_request(
        running.public, "/auth/quota/status", {"Cookie": cookie, "X-Quota-User": identity}
    )
    assert status in (400, 401), body[:200]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
section_names = st.sampled_from(
    [
        "quota",
        "listen",
        "upstream",
        "identity",
        "session",
        "tokens",
        "redirects",
        "limits",
        "log",
        "extra",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.dictionaries(
        section_names,
        st.one_of(json_values, st.dictionaries(st.text(max_size=24), json_values, max_size=6)),
        max_size=6,
    )
)
def test_any_config_document_gives_a_config_or_one_config_error(doc: dict[str, Any]) -> None:
    env = {"QUOTA_CLIENT_ID": "c", "QUOTA_CLIENT_SECRET": "s", "SESSION_SECRET": "x" * 32}
    problems: list[str] = []
    try:
        build_config(doc, env)
    except ConfigError as exc:
        problems = exc.problems or ["<empty>"]
    assert all(":" in p for p in problems)  # each problem names its key path
