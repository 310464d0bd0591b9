"""A call's wait for the remote is what its connection saw, not what its busy caller saw."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sidecar.wire_times import waited

STARTED = 100.0
NOW = 100.9  # when the caller resumed: long after the answer was read


@pytest.mark.parametrize(
    ("made", "sent", "answered", "expected"),
    [
        # A kept-alive connection: from the request's last byte written to the answer's first read.
        (50.0, 100.2, 100.25, 0.05),
        # This call opened the connection: connecting counts too, building the request does not.
        (100.1, 100.15, 100.2, 0.15),
        # Clocks read out of order never make a negative wait.
        (50.0, 100.3, 100.25, 0.0),
    ],
)
def test_the_wait_runs_on_the_wire_from_the_request_sent_to_the_answer_read(
    made: float, sent: float, answered: float, expected: float
) -> None:
    response = SimpleNamespace(wire=(made, sent, answered), history=())
    assert waited(response, STARTED, NOW) == pytest.approx(expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "response",
    [
        None,  # no answer
        SimpleNamespace(wire=None, history=()),  # a connection that noted nothing
        SimpleNamespace(wire=(50.0, 100.2, 100.25), history=("a redirect",)),  # several calls
    ],
)
def test_without_the_connections_times_the_wait_is_the_callers(response: object) -> None:
    assert waited(response, STARTED, NOW) == pytest.approx(NOW - STARTED)  # type: ignore[arg-type]
