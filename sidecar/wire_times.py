"""When an outgoing call's request left and its answer arrived, as its connection saw them.

Timed from the caller's side (from before ``session.request`` to the moment the caller resumes
with the answer's headers), a call's wait for Quota or the host app would also hold the time the
request waited to be written (on Python 3.11 the body goes out from a task of its own) and the
time the answer, already read, waited for its caller to be resumed behind other requests' work:
the sidecar's own queue, charged to Quota, so that ``added_latency`` would read near zero under
load. The connection notes instead::

    caller:   request() ─ connect (new connection only) ─ build, write ─ ... ─ resumed
    wire:                └─ made_at                    sent_at ──► answered_at
                                                       last byte    head read
                                                       written      and parsed

    wait = (made_at - started, when this call opened the connection) + (answered_at - sent_at)

Connecting (and a TLS handshake) is the network's time; building and writing the request, and
everything after the answer was read, are the sidecar's. What this cannot see: the answer
reaches the socket a little before the loop reads it, and on a loaded loop that gap (up to about
one turn of the loop) is still counted as the remote's. No user-space API gives a TCP socket's
receive time (``SIOCGSTAMP`` is not kept for TCP; ``SO_TIMESTAMPNS`` needs ``recvmsg``, which
the event loops do not use), so this is as close as the loop's own timestamps get.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader


class TimedResponseHandler(ResponseHandler):
    """aiohttp's protocol for one outgoing connection, noting when each call's bytes moved."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.made_at = 0.0
        self.sent_at: float | None = None
        self.answered_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made_at = time.perf_counter()
        super().connection_made(transport)

    def start_timeout(self) -> None:
        # aiohttp starts the read timeout once a request is fully written. (The forwarder starts
        # it again once the head is in, after the call's times were taken: the next call on the
        # connection sets its own.)
        self.sent_at = time.perf_counter()
        super().start_timeout()

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        # The parser hands over each answer's head as it completes: once per call, however
        # many reads its body takes.
        self.answered_at = time.perf_counter()
        super().feed_data(data, size)


def timed_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """A ``TCPConnector`` whose connections are ``TimedResponseHandler``s."""
    connector = aiohttp.TCPConnector(**kwargs)
    # aiohttp has no public setting for its protocol class; it keeps the factory here.
    if not isinstance(getattr(connector, "_factory", None), functools.partial):
        raise RuntimeError("this aiohttp version makes its connections differently")
    factory: Any = functools.partial(TimedResponseHandler, loop=asyncio.get_running_loop())
    connector._factory = factory
    return connector


class TimedResponse(aiohttp.ClientResponse):
    """A response that keeps its connection's times for the call it answers."""

    wire: tuple[float, float, float] | None = None  # (made_at, sent_at, answered_at)

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol  # gone from the connection once a whole answer is read
        started = await super().start(connection)
        if isinstance(protocol, TimedResponseHandler):
            sent, answered = protocol.sent_at, protocol.answered_at
            if sent is not None and answered is not None:
                self.wire = (protocol.made_at, sent, answered)
        return started


def waited(response: aiohttp.ClientResponse | None, started: float, now: float) -> float:
    """How long a call begun at ``started`` waited for the remote (see the module docstring);
    ``now - started`` when the connection's times are not known (redirects followed, or no
    answer)."""
    wire: tuple[float, float, float] | None = getattr(response, "wire", None)
    if wire is None or response is None or response.history:
        return now - started
    made, sent, answered = wire
    return max(0.0, made - started) + max(0.0, answered - sent)
