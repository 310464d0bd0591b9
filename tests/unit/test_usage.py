"""Reading Quota's quota block from answers as they stream: JSON, OpenAI SSE, Anthropic SSE.

The streams below are the emulator's (recorded, shortened), with the model's text written as raw
UTF-8 so a split can land inside a multi-byte character.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.forwarding.usage import (
    JsonObserver,
    SseObserver,
    Unreadable,
    Usage,
    observer_for,
)
from sidecar.guards.metered import endpoint_of, model_in_path

SSE = {"Content-Type": "text/event-stream"}
JSON = {"Content-Type": "application/json; charset=utf-8"}


def _chunk(content: dict[str, object], finish: str | None = None, **extra: object) -> str:
    body = {
        "id": "chatcmpl-d77c9f32",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": content, "finish_reason": finish}],
        **extra,
    }
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _named(name: str, payload: dict[str, object]) -> str:
    data = json.dumps({"type": name, **payload}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n"


QUOTA = {
    "credits_used": 6100,
    "balance_before": 4993900,
    "balance_after": 4987800,
    "billing_mode": "user",
}
OPENAI_STREAM = (
    _chunk({"role": "assistant", "content": "Echo"})
    + _chunk({"content": " héllo wörld"})
    + _chunk({"content": " 日本語 🙂"})
    + _chunk({"content": ' the word "usage" and quota'})
    + _chunk(
        {},
        "stop",
        usage={"prompt_tokens": 5, "completion_tokens": 14, "total_tokens": 19},
        quota=QUOTA,
    )
    + "data: [DONE]\n\n"
).encode()
OPENAI_USAGE = Usage(6100, 4987800, 5, 14, 19, model="gpt-4o-mini")

ANTHROPIC_STREAM = (
    _named(
        "message_start",
        {
            "message": {
                "id": "msg_624e2a5c",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-3-5-haiku",
                "usage": {"input_tokens": 5, "output_tokens": 0},
            }
        },
    )
    + _named("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    + _named("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Écho"}})
    + _named("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " 🙂"}})
    + _named("content_block_stop", {"index": 0})
    + _named(
        "message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 14}}
    )
    + _named("message_stop", {})
    + _named("quota_usage", {"quota": {**QUOTA, "credits_used": 12200, "balance_after": 4963400}})
).encode()
ANTHROPIC_USAGE = Usage(12200, 4963400, 5, 14, None, model="claude-3-5-haiku")

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-27e0f0e6",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Écho 日本語"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 14, "total_tokens": 19},
        "quota": QUOTA,
    },
    ensure_ascii=False,
).encode()
MESSAGES_JSON = json.dumps(
    {
        "id": "msg_7c57c466",
        "type": "message",
        "content": [{"type": "text", "text": "Écho"}],
        "model": "claude-3-5-haiku",
        "usage": {"input_tokens": 5, "output_tokens": 14},
        "quota": {**QUOTA, "credits_used": 12200, "balance_after": None},
    }
).encode()


# A server may spread one event's data over several ``data:`` lines (joined with "\n").
_FINAL = json.dumps({"usage": {"prompt_tokens": 1}, "quota": QUOTA}, indent=1)
MULTILINE_STREAM = (
    ": keep-alive\nid: 7\nretry: 1000\n"
    + "".join(f"data:{line}\n" for line in _FINAL.splitlines())
    + "\ndata: [DONE]\n\n"
).encode()
MULTILINE_USAGE = Usage(6100, 4987800, 1, None, None)


def read_usage(chunks: list[bytes], headers: dict[str, str]) -> Usage | None:
    """Feed a whole 200 answer, chunk by chunk, as the forwarder does."""
    observer = observer_for(200, headers)
    assert observer is not None
    for chunk in chunks:
        observer.feed(chunk)
    return observer.finish()


def _crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


def _cr(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r")


# Every recorded stream, in every line-end style the SSE grammar allows, with what it says.
RECORDED = {
    "openai": (OPENAI_STREAM, OPENAI_USAGE),
    "openai_crlf": (_crlf(OPENAI_STREAM), OPENAI_USAGE),
    "openai_cr": (_cr(OPENAI_STREAM), OPENAI_USAGE),
    "anthropic": (ANTHROPIC_STREAM, ANTHROPIC_USAGE),
    "anthropic_crlf": (_crlf(ANTHROPIC_STREAM), ANTHROPIC_USAGE),
    "anthropic_cr": (_cr(ANTHROPIC_STREAM), ANTHROPIC_USAGE),
    "multiline": (MULTILINE_STREAM, MULTILINE_USAGE),
    "multiline_crlf": (_crlf(MULTILINE_STREAM), MULTILINE_USAGE),
    "multiline_cr": (_cr(MULTILINE_STREAM), MULTILINE_USAGE),
}


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def test_a_chat_json_answer_gives_credits_balance_and_openai_tokens() -> None:
    assert read_usage([CHAT_JSON], JSON) == Usage(6100, 4987800, 5, 14, 19, model="gpt-4o-mini")


def test_a_messages_json_answer_gives_anthropic_tokens_and_a_null_balance() -> None:
    assert read_usage([MESSAGES_JSON], JSON) == Usage(
        12200, None, 5, 14, None, model="claude-3-5-haiku"
    )
    assert read_usage([MESSAGES_JSON], JSON).tokens == 19  # type: ignore[union-attr]


def test_a_gemini_json_answer_gives_its_usage_metadata() -> None:
    body = json.dumps(
        {
            "candidates": [],
            "usageMetadata": {
                "promptTokenCount": 3,
                "candidatesTokenCount": 4,
                "totalTokenCount": 7,
            },
            "quota": QUOTA,
        }
    ).encode()
    assert read_usage([body], JSON) == Usage(6100, 4987800, 3, 4, 7)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_a_recorded_stream_read_whole_gives_its_usage(name: str) -> None:
    stream, usage = RECORDED[name]
    assert read_usage([stream], SSE) == usage


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_a_recorded_stream_read_one_byte_at_a_time_gives_the_same_usage(name: str) -> None:
    stream, usage = RECORDED[name]
    assert read_usage([stream[i : i + 1] for i in range(len(stream))], SSE) == usage


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(RECORDED)),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_a_recorded_stream_split_anywhere_gives_the_same_usage(name: str, cuts: list[int]) -> None:
    stream, usage = RECORDED[name]
    chunks = _split(stream, [c % (len(stream) + 1) for c in cuts])
    assert b"".join(chunks) == stream
    assert read_usage(chunks, SSE) == usage


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_a_json_answer_split_anywhere_gives_the_same_usage(cuts: list[int]) -> None:
    chunks = _split(CHAT_JSON, [c % (len(CHAT_JSON) + 1) for c in cuts])
    assert read_usage(chunks, JSON) == Usage(6100, 4987800, 5, 14, 19, model="gpt-4o-mini")


def test_a_crlf_split_between_its_cr_and_its_lf_is_one_line_end() -> None:
    stream = _crlf(OPENAI_STREAM)
    cut = stream.index(b"\r\n\r\n") + 1  # between the first event's "\r" and "\n"
    assert read_usage([stream[:cut], stream[cut:]], SSE) == OPENAI_USAGE
    cut += 2  # between the blank line's "\r" and "\n"
    assert read_usage([stream[:cut], stream[cut:]], SSE) == OPENAI_USAGE


def test_a_data_field_over_several_lines_is_joined_and_comments_and_ids_are_ignored() -> None:
    assert read_usage([MULTILINE_STREAM], SSE) == MULTILINE_USAGE


def test_a_byte_order_mark_before_the_first_event_is_skipped() -> None:
    stream = b"\xef\xbb\xbf" + OPENAI_STREAM[OPENAI_STREAM.rindex(b"data: {") :]
    assert read_usage([stream[:2], stream[2:]], SSE) == OPENAI_USAGE


def test_a_stream_that_ends_without_a_quota_block_says_so() -> None:
    cut = OPENAI_STREAM.rindex(b"data: {")
    observer = observer_for(200, SSE)
    assert observer is not None
    observer.feed(OPENAI_STREAM[:cut])
    assert observer.finish() is None
    assert observer.unread == "no_quota_block"


@pytest.mark.parametrize(
    "quota",
    [{"credits_used": "6100"}, {"credits_used": -1}, {"credits_used": True}, {}, "6100"],
)
def test_a_quota_block_not_in_quotas_shape_is_unparseable(quota: object) -> None:
    observer = observer_for(200, JSON)
    assert observer is not None
    observer.feed(json.dumps({"quota": quota}).encode())
    assert observer.finish() is None
    assert observer.unread == "unparseable"


def test_a_quota_event_that_is_not_json_is_unparseable() -> None:
    observer = observer_for(200, SSE)
    assert observer is not None
    observer.feed(b'event: quota_usage\ndata: {"quota": {"credits_used": 1\n\n')
    assert observer.finish() is None
    assert observer.unread == "unparseable"


def test_an_event_over_the_limit_gives_up_and_keeps_no_more_than_the_limit() -> None:
    observer = SseObserver(max_bytes=1000)
    huge = b'data: {"text": "' + b"x" * 5000 + b'"}\n\n' + OPENAI_STREAM
    for i in range(0, len(huge), 100):
        observer.feed(huge[i : i + 100])
        assert len(observer._pending) <= 1000
    assert observer.finish() is None
    assert observer.unread == "too_large"


def test_a_json_body_over_the_limit_gives_up_and_drops_what_it_kept() -> None:
    observer = JsonObserver(max_bytes=100)
    observer.feed(CHAT_JSON[:90])
    observer.feed(CHAT_JSON[90:])
    assert observer._chunks == []
    assert observer.finish() is None
    assert observer.unread == "too_large"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_answer_is_read_from_the_side_copy(encoding: str) -> None:
    packed = gzip.compress(CHAT_JSON) if encoding == "gzip" else zlib.compress(OPENAI_STREAM)
    headers = {**(JSON if encoding == "gzip" else SSE), "Content-Encoding": encoding}
    chunks = [packed[i : i + 7] for i in range(0, len(packed), 7)]
    expected = Usage(6100, 4987800, 5, 14, 19, model="gpt-4o-mini")
    assert read_usage(chunks, headers) == expected


def test_a_compression_bomb_inflates_no_further_than_the_event_limit() -> None:
    bomb = gzip.compress(b'{"text": "' + b"x" * (64 * 1024 * 1024))
    observer = observer_for(200, {**JSON, "Content-Encoding": "gzip"})
    assert observer is not None
    observer.feed(bomb)
    assert observer.finish() is None
    assert observer.unread == "too_large"


def test_a_corrupt_compressed_answer_is_an_encoding_problem() -> None:
    observer = observer_for(200, {**JSON, "Content-Encoding": "gzip"})
    assert observer is not None
    observer.feed(b"not gzip at all")
    assert observer.finish() is None
    assert observer.unread == "encoding"


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, SSE, "sse"),
        (200, JSON, "json"),
        (200, {"Content-Type": "application/vnd.api+json"}, "json"),
        (402, JSON, None),  # Quota bills only what it answered
        (201, JSON, None),
        (200, {"Content-Type": "audio/mpeg"}, "content_type"),
        (200, {}, "content_type"),
        (200, {**JSON, "Content-Encoding": "br"}, "encoding"),
    ],
)
def test_only_200_json_and_event_stream_answers_are_read(
    status: int, headers: dict[str, str], expected: str | None
) -> None:
    observer = observer_for(status, headers)
    if expected is None:
        assert observer is None
    elif expected == "sse":
        assert isinstance(observer, SseObserver)
    elif expected == "json":
        assert isinstance(observer, JsonObserver)
    else:
        assert isinstance(observer, Unreadable)
        assert observer.unread == expected


@pytest.mark.parametrize(
    ("path", "endpoint", "model"),
    [
        ("/v1/chat/completions", "chat", None),
        ("/v1/messages", "messages", None),
        ("/v1/messages/count_tokens", "other", None),
        ("/v1/audio/speech", "audio", None),
        ("/v1beta/models/gemini-2.0-flash:streamGenerateContent", "gemini", "gemini-2.0-flash"),
        ("/v1beta/models/:generateContent", "gemini", None),
        ("/v1/anything/else", "other", None),
    ],
)
def test_every_billed_path_falls_in_one_endpoint_and_gemini_names_its_model(
    path: str, endpoint: str, model: str | None
) -> None:
    assert endpoint_of(path) == endpoint
    assert model_in_path(path) == model
