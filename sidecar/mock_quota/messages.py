"""``POST /v1/messages``: Anthropic-compatible messages, plain or SSE, billed like chat.

The request is Anthropic's ``{model, max_tokens, messages, system?, stream?}``; the answer is a
``message`` object with one text block, Anthropic's ``usage`` and Quota's ``quota`` block. Billing
is the chat route's (``sidecar.mock_quota.chat``): the maximum cost is held before any output
(402 ``insufficient_credits`` otherwise, nothing charged), the actual cost is charged at the end,
a stream the client cuts off pays for the prompt and the words already sent, and each settled
call sends ``usage.completed`` (and ``balance.low`` on crossing the threshold).

A stream speaks Anthropic's named events, one ``content_block_delta`` per word, ``chunk_delay_s``
apart, then Quota's own last event (Anthropic SDKs skip names they do not know)::

    event: message_start        {"type": "message_start", "message": {... "content": []}}
    event: content_block_start  {"type": "content_block_start", "index": 0, ...}
    event: content_block_delta  {"type": "content_block_delta", "delta": {"type": "text_delta"}}
    event: content_block_stop
    event: message_delta        {"delta": {"stop_reason": "end_turn"}, "usage": {...}}
    event: message_stop
    event: quota_usage          {"type": "quota_usage", "quota": {"credits_used", ...}}

Errors keep Quota's ``{"error": {"code", "message", "type"}}`` and add Anthropic's top-level
``"type": "error"``, so both kinds of client read them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Final

from aiohttp import web

from .bearer import require_bearer
from .body import json_object
from .catalog import Model, count_tokens, find_model, reply_for, reply_words
from .chat import ChatRequest, quota_block, reserve, sse_response
from .errors import ApiError, error_type
from .scopes import CREDITS_SPEND
from .state import MOCK_QUOTA_KEY, MockQuota
from .wallets import Reservation

# Anthropic's names for why a message ended.
STOP_END_TURN: Final = "end_turn"
STOP_MAX_TOKENS: Final = "max_tokens"
_ROLES: Final = ("user", "assistant")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _text_of(content: object, what: str) -> str:
    """A string, or the text of a list of content blocks (non-text blocks count for nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [block.get("text") for block in content if isinstance(block, dict)]
        return " ".join(part for part in parts if isinstance(part, str))
    raise _invalid(f"{what} must be a string or a list of content blocks.")


def _max_tokens(body: dict[str, object]) -> int:
    value = body.get("max_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _invalid("max_tokens is required and must be a positive integer.")
    return value


async def parse_messages_request(request: web.Request) -> ChatRequest:
    """Read Anthropic's request into the chat route's shape, which billing already knows."""
    body = await json_object(request)
    model_id = body.get("model")
    model: Model | None = find_model(model_id) if isinstance(model_id, str) else None
    if model is None:
        raise _invalid(f"Unknown model {model_id!r}; GET /v1/models lists the available ones.")
    max_tokens = _max_tokens(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list.")
    texts: list[str] = []
    if "system" in body:
        texts.append(_text_of(body["system"], "system"))
    last_user = ""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _invalid("Each message must be an object whose role is user or assistant.")
        text = _text_of(message.get("content"), "A message's content")
        texts.append(text)
        if message["role"] == "user":
            last_user = text
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be a boolean.")
    return ChatRequest(
        model=model,
        prompt_tokens=max(1, count_tokens(texts)),
        last_user_message=last_user,
        max_tokens=max_tokens,
        stream=stream,
    )


def _error_response(exc: ApiError) -> web.Response:
    error = {"code": exc.code, "message": exc.message, "type": error_type(exc.status)}
    return web.json_response(
        {"type": "error", "error": error}, status=exc.status, headers=exc.headers
    )


async def messages(request: web.Request) -> web.StreamResponse:
    quota = request.app[MOCK_QUOTA_KEY]
    quota.counters["messages"] += 1
    try:
        bearer = require_bearer(request, CREDITS_SPEND)
        call = await parse_messages_request(request)
        words, finish_reason = reply_words(reply_for(call.last_user_message), call.max_tokens)
        reservation = reserve(request, bearer.email, call, counters="messages")
    except ApiError as exc:
        return _error_response(exc)
    stop_reason = STOP_MAX_TOKENS if finish_reason == "length" else STOP_END_TURN
    message_id = f"msg_{secrets.token_hex(12)}"
    if call.stream:
        return await _stream(request, quota, call, reservation, words, stop_reason, message_id)
    balance_after = reservation.settle(call.model.cost(call.prompt_tokens, len(words)))
    return web.json_response(
        {
            **_message(message_id, call.model.id, [_text_block(" ".join(words))]),
            "stop_reason": stop_reason,
            "usage": {"input_tokens": call.prompt_tokens, "output_tokens": len(words)},
            "quota": quota_block(reservation, balance_after),
        }
    )


def _message(message_id: str, model: str, content: list[dict[str, str]]) -> dict[str, object]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
    }


def _text_block(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _event(name: str, payload: dict[str, object]) -> bytes:
    data = json.dumps({"type": name, **payload}, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


async def _stream(
    request: web.Request,
    quota: MockQuota,
    call: ChatRequest,
    reservation: Reservation,
    words: list[str],
    stop_reason: str,
    message_id: str,
) -> web.StreamResponse:
    response = sse_response()
    quota.counters["messages.streamed"] += 1
    delay_s = quota.settings.chunk_delay_s
    sent = 0
    try:
        await response.prepare(request)
        start = _message(message_id, call.model.id, [])
        start["usage"] = {"input_tokens": call.prompt_tokens, "output_tokens": 0}
        await response.write(_event("message_start", {"message": start}))
        await response.write(
            _event("content_block_start", {"index": 0, "content_block": _text_block("")})
        )
        for index, word in enumerate(words):
            if index and delay_s > 0:
                await asyncio.sleep(delay_s)
            delta = {"type": "text_delta", "text": word if index == 0 else f" {word}"}
            await response.write(_event("content_block_delta", {"index": 0, "delta": delta}))
            sent += 1
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await response.write(_event("content_block_stop", {"index": 0}))
        balance_after = reservation.settle(call.model.cost(call.prompt_tokens, sent))
        await response.write(
            _event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": sent},
                },
            )
        )
        await response.write(_event("message_stop", {}))
        await response.write(
            _event("quota_usage", {"quota": quota_block(reservation, balance_after)})
        )
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the finally block bills what it received
    finally:
        if reservation.charged is None:
            quota.counters["messages.stream_aborted"] += 1
            reservation.settle(call.model.cost(call.prompt_tokens, sent))
    return response


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/messages", messages)]
