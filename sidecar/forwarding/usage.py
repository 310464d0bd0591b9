"""Read what a billed call cost from Quota's answer, on a side copy of the chunks as they stream.

Quota adds a ``quota`` block — ``{credits_used, balance_before, balance_after, billing_mode}`` —
to every billed answer, in one of three places:

* a plain JSON body (chat, messages): a top-level ``quota`` object beside the model's ``usage``
  (OpenAI ``prompt_tokens``/``completion_tokens``/``total_tokens``, Anthropic
  ``input_tokens``/``output_tokens``, Gemini ``usageMetadata``);
* an OpenAI-style SSE stream: the last ``data:`` chunk before ``data: [DONE]`` carries ``quota``
  (and ``usage``);
* an Anthropic-style SSE stream: ``usage`` in ``message_start`` and ``message_delta``, then
  Quota's own ``event: quota_usage`` whose data carries ``quota``.

An observer is fed exactly the chunks written to the client and never changes, delays or holds
them back; it keeps only the partial event in progress (a JSON body is one event) and gives up on
a response whose single event passes ``MAX_EVENT_BYTES``. Chunk boundaries may fall anywhere —
inside a multi-byte character, between ``\\r`` and ``\\n``, between two ``data:`` lines — since
events are assembled as bytes and decoded only once whole. To stay cheap, a stream event is
JSON-parsed only when its bytes mention ``quota`` or ``usage``; the other events (the model's
text deltas) are skipped after a substring search.

Only answers that can carry the block are read (``observer_for``): status 200, a JSON or
``text/event-stream`` body, not compressed or compressed with gzip/deflate (decompressed on the
side copy, bounded like the rest).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeGuard

# One event (a JSON body counts as one) larger than this is not parsed: the response's usage is
# given up, and memory stays bounded. Quota's blocks are a few hundred bytes.
MAX_EVENT_BYTES: Final = 1024 * 1024
# Decompressed bytes produced per step, so a compressed bomb never inflates past the limit.
_INFLATE_STEP_BYTES: Final = 64 * 1024
_BOM: Final = b"\xef\xbb\xbf"
_EVENT_ENDS: Final = (b"\n\n", b"\r\n\r\n")

# Why a billed answer's usage could not be read (a bounded metric label).
UNREAD_REASONS: Final = (
    "no_quota_block",  # the answer ended without a readable quota block
    "client_closed",  # the client left before the block arrived
    "too_large",  # one event (or the JSON body) passed MAX_EVENT_BYTES
    "unparseable",  # the block's event was not valid JSON, or the block not Quota's shape
    "encoding",  # compressed with something other than gzip or deflate, or corrupt
    "content_type",  # a billed answer that is neither JSON nor an event stream (audio)
)


@dataclass(frozen=True, slots=True)
class Usage:
    """What one call cost (``credits_used``) and the tokens the model counted, if it said."""

    credits_used: int
    balance_after: int | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    model: str | None = None  # as the answer names it

    @property
    def tokens(self) -> int | None:
        """All tokens of the call: ``total_tokens``, else prompt + completion when both known."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return self.prompt_tokens + self.completion_tokens
        return None


class UsageObserver(Protocol):
    """Fed each chunk of one answer as it goes to the client; then asked what it found."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Usage | None:
        """The usage read, once the answer has ended (``None``: see ``unread``)."""
        ...

    @property
    def unread(self) -> str | None:
        """Why no usage was read (one of ``UNREAD_REASONS``), or ``None`` if it was."""
        ...


class _Found:
    """What the events read so far say; ``usage()`` once a quota block was seen."""

    __slots__ = ("balance_after", "completion", "credits", "failure", "model", "prompt", "total")

    def __init__(self) -> None:
        self.credits: int | None = None
        self.balance_after: int | None = None
        self.prompt: int | None = None
        self.completion: int | None = None
        self.total: int | None = None
        self.model: str | None = None
        self.failure: str | None = None

    def take(self, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        quota = payload.get("quota")
        if quota is not None:
            self._take_quota(quota)
        for holder in (payload, payload.get("message")):  # Anthropic's message_start nests it
            if isinstance(holder, dict):
                self._take_tokens(holder.get("usage"))
                self._take_tokens(holder.get("usageMetadata"))
                model = holder.get("model")
                if isinstance(model, str) and 0 < len(model) <= 128 and model.isprintable():
                    self.model = model

    def _take_quota(self, quota: object) -> None:
        credits = quota.get("credits_used") if isinstance(quota, dict) else None
        if not isinstance(quota, dict) or not _is_count(credits):
            self.failure = "unparseable"
            return
        self.credits = credits
        balance = quota.get("balance_after")
        self.balance_after = balance if _is_int(balance) else None
        self.failure = None

    def _take_tokens(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        for names, attr in _TOKEN_FIELDS:
            for name in names:
                value = usage.get(name)
                if _is_count(value):
                    setattr(self, attr, value)
                    break

    def usage(self) -> Usage | None:
        if self.credits is None:
            return None
        return Usage(
            credits_used=self.credits,
            balance_after=self.balance_after,
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            total_tokens=self.total,
            model=self.model,
        )


# (field names, OpenAI first, then Anthropic, then Gemini) -> attribute of ``_Found``.
_TOKEN_FIELDS: Final = (
    (("prompt_tokens", "input_tokens", "promptTokenCount"), "prompt"),
    (("completion_tokens", "output_tokens", "candidatesTokenCount"), "completion"),
    (("total_tokens", "totalTokenCount"), "total"),
)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> TypeGuard[int]:
    return _is_int(value) and value >= 0


def _loads(data: bytes) -> object:
    """JSON from UTF-8 bytes; ``ValueError`` (``UnicodeDecodeError`` included) when it is not."""
    return json.loads(data)


class JsonObserver:
    """A plain JSON answer: the body is kept (up to ``MAX_EVENT_BYTES``) and parsed at its end."""

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._parsed = False
        self._failure: str | None = None
        self._found = _Found()

    @property
    def stopped(self) -> bool:
        return self._failure is not None

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None:
            return
        self._size += len(chunk)
        if self._size > self._max:
            self._chunks.clear()
            self._failure = "too_large"
            return
        self._chunks.append(chunk)

    def finish(self) -> Usage | None:
        if self._failure is None and not self._parsed:
            self._parsed = True
            body = b"".join(self._chunks)
            self._chunks.clear()
            if b'"quota"' not in body:  # nothing to read: spare the parse
                self._failure = "no_quota_block"
                return None
            try:
                self._found.take(_loads(body))
            except ValueError:
                self._failure = "unparseable"
            else:
                if self._found.credits is None:
                    self._failure = self._found.failure or "no_quota_block"
        return None if self._failure is not None else self._found.usage()

    @property
    def unread(self) -> str | None:
        return self._failure


class SseObserver:
    """A ``text/event-stream`` answer, read event by event as the chunks go by.

    Line ends are ``\\n``, ``\\r\\n`` or ``\\r`` (the SSE grammar); they are folded to ``\\n``,
    remembering a ``\\r`` that ended a chunk so a ``\\n`` opening the next is not a second line
    end. Events end at a blank line. Only the event in progress is kept.
    """

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_bytes
        self._pending = bytearray()  # the event in progress, line ends already folded
        self._after_cr = False
        self._at_start = True
        self._failure: str | None = None
        self._found = _Found()

    @property
    def stopped(self) -> bool:
        return self._failure is not None

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None or not chunk:
            return
        pending = self._pending
        if (
            not pending
            and not self._after_cr
            and chunk.endswith(_EVENT_ENDS)
            and b"quota" not in chunk
            and b"usage" not in chunk
        ):
            # The usual chunk: whole events of model text, none of Quota's. Nothing to keep.
            self._at_start = False
            return
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the second half of a "\r\n" split across reads
        if b"\r" in chunk:
            self._after_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        pos = 0
        if not pending:
            # Whole events before the first mention of quota or usage are skipped unread.
            hits = [i for i in (chunk.find(b"quota"), chunk.find(b"usage")) if i >= 0]
            cut = chunk.rfind(b"\n\n", 0, min(hits) if hits else len(chunk))
            if cut >= 0:
                self._at_start = False
                pos = cut + 2
        elif pending[-1:] == b"\n" and chunk[:1] == b"\n":
            self._event(bytes(pending))  # a blank line split from the line before it
            pending.clear()
            pos = 1
        while (end := chunk.find(b"\n\n", pos)) >= 0:
            if pending:
                pending += chunk[pos:end]
                event = bytes(pending)
                pending.clear()
            else:
                event = chunk[pos:end]
            self._event(event)
            pos = end + 2
            if self._failure is not None:
                return
        if pos < len(chunk):
            if len(pending) + len(chunk) - pos > self._max:
                pending.clear()
                self._failure = "too_large"
                return
            pending += chunk[pos:]

    def _event(self, block: bytes) -> None:
        """One block of lines up to a blank line (it may hold more blank lines: empty events)."""
        if len(block) > self._max:
            self._failure = "too_large"
            return
        if self._at_start:
            self._at_start = False
            block = block.removeprefix(_BOM)
        if b"quota" not in block and b"usage" not in block:
            return  # the model's text: nothing of Quota's in it
        data: list[bytes] = []
        name = b""
        for line in block.split(b"\n"):
            if not line:
                self._dispatch(name, data)
                data, name = [], b""
            elif line.startswith(b"data"):
                field, _, value = line.partition(b":")
                if field == b"data":
                    data.append(value[1:] if value[:1] == b" " else value)
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        self._dispatch(name, data)

    def _dispatch(self, name: bytes, data: list[bytes]) -> None:
        if not data:
            return
        payload = b"\n".join(data)
        if payload == b"[DONE]" or (b"quota" not in payload and b"usage" not in payload):
            return
        try:
            self._found.take(_loads(payload))
        except ValueError:
            if name == b"quota_usage" or b'"quota"' in payload:
                self._found.failure = "unparseable"

    def finish(self) -> Usage | None:
        return None if self._failure is not None else self._found.usage()

    @property
    def unread(self) -> str | None:
        if self._failure is not None:
            return self._failure
        if self._found.credits is None:
            return self._found.failure or "no_quota_block"
        return None


class Inflating:
    """Decompresses a gzip- or deflate-encoded answer for the observer behind it, in bounded
    steps; the client still gets the compressed bytes."""

    def __init__(self, inner: JsonObserver | SseObserver) -> None:
        self._inner = inner
        # 32 + MAX_WBITS: gzip or zlib, told apart by the header.
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self._corrupt = False

    def feed(self, chunk: bytes) -> None:
        if self._corrupt or self._inner.stopped:
            return
        try:
            data = chunk
            while data and not self._inner.stopped:
                self._inner.feed(self._zlib.decompress(data, _INFLATE_STEP_BYTES))
                data = self._zlib.unconsumed_tail
        except zlib.error:
            self._corrupt = True

    def finish(self) -> Usage | None:
        if not self._corrupt and not self._inner.stopped:
            try:
                self._inner.feed(self._zlib.flush())
            except zlib.error:
                self._corrupt = True
        return None if self._corrupt else self._inner.finish()

    @property
    def unread(self) -> str | None:
        return "encoding" if self._corrupt else self._inner.unread


class Unreadable:
    """A billed answer whose usage cannot be read at all; says why."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def feed(self, chunk: bytes) -> None:
        return None

    def finish(self) -> Usage | None:
        return None

    @property
    def unread(self) -> str | None:
        return self._reason


def observer_for(status: int, headers: Mapping[str, str]) -> UsageObserver | None:
    """The observer for one answer to a billed call, or ``None`` when it cannot carry usage
    (anything but 200: Quota bills only what it answered)."""
    if status != 200:
        return None
    media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    inner: JsonObserver | SseObserver
    if media == "text/event-stream":
        inner = SseObserver()
    elif media == "application/json" or media.endswith("+json"):
        inner = JsonObserver()
    else:
        return Unreadable("content_type")
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return inner
    if encoding in ("gzip", "x-gzip", "deflate"):
        return Inflating(inner)
    return Unreadable("encoding")
