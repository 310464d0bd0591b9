"""``POST /v1/chat/completions``: OpenAI-compatible chat, plain or SSE, billed to the wallet.

Billing follows Quota: the maximum cost (``prompt * in + max_tokens * out``) is held before any
output, or the call fails with 402 ``insufficient_credits`` and nothing is charged. The actual
cost is charged when the answer is complete; the rest of the hold goes back. A stream the
client cuts off is charged for the prompt and the words already sent. However the call ends, its
settlement sends ``usage.completed`` (and ``balance.low`` on crossing the threshold): ``reserve``
attaches ``events.on_settle`` to the hold.

A stream sends one ``chat.completion.chunk`` event per word, ``chunk_delay_s`` apart and each
flushed on its own, then a final chunk with ``finish_reason``, ``usage`` and the ``quota``
block, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass

from aiohttp import web

from . import events
from .bearer import require_bearer
from .body import json_object
from .catalog import Model, count_tokens, find_model, reply_for, reply_words
from .errors import ApiError
from .scopes import CREDITS_SPEND
from .state import MOCK_QUOTA_KEY, MockQuota
from .wallets import Reservation
from .webhooks import WEBHOOKS_KEY

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ChatRequest:
    model: Model
    prompt_tokens: int
    last_user_message: str
    max_tokens: int
    stream: bool


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _text_of(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    raise _invalid("A message's content must be a string or a list of content parts.")


def _positive_int(body: dict[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _invalid(f"{name} must be a positive integer.")
    return value


async def parse_chat_request(request: web.Request) -> ChatRequest:
    body = await json_object(request)
    model_id = body.get("model")
    model = find_model(model_id) if isinstance(model_id, str) else None
    if model is None:
        raise _invalid(f"Unknown model {model_id!r}; GET /v1/models lists the available ones.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list.")
    texts: list[str] = []
    last_user = ""
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid("Each message must be an object with a role.")
        text = _text_of(message.get("content"))
        texts.append(text)
        if message["role"] == "user":
            last_user = text
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be a boolean.")
    max_tokens = _positive_int(body, "max_tokens") or _positive_int(body, "max_completion_tokens")
    return ChatRequest(
        model=model,
        prompt_tokens=max(1, count_tokens(texts)),
        last_user_message=last_user,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        stream=stream,
    )


def quota_block(reservation: Reservation, balance_after: int) -> dict[str, object]:
    return {
        "credits_used": reservation.charged,
        "balance_before": reservation.balance_before,
        "balance_after": balance_after,
        "billing_mode": "user",
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse_response() -> web.StreamResponse:
    """An unprepared event-stream response, unbuffered by any proxy in between."""
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )


def reserve(
    request: web.Request, email: str, chat: ChatRequest, *, counters: str = "chat"
) -> Reservation:
    """Hold the most the call can cost; 402 before any output when the wallet cannot cover it.

    ``counters`` names the route family whose ``<family>.insufficient_credits`` is counted.
    Settling the hold sends the call's webhooks.
    """
    quota = request.app[MOCK_QUOTA_KEY]
    most = chat.model.cost(chat.prompt_tokens, chat.max_tokens)
    hook = events.on_settle(request.app[WEBHOOKS_KEY], chat.model.id)
    reservation = quota.wallets.reserve(email, most, on_settle=hook)
    if reservation is None:
        quota.counters[f"{counters}.insufficient_credits"] += 1
        raise ApiError(
            402,
            "insufficient_credits",
            f"This request may cost up to {most} credits; the wallet holds "
            f"{quota.balance(email)}. Top up at Quota to continue.",
        )
    return reservation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    quota = request.app[MOCK_QUOTA_KEY]
    quota.counters["chat.completions"] += 1
    bearer = require_bearer(request, CREDITS_SPEND)
    chat = await parse_chat_request(request)
    words, finish_reason = reply_words(reply_for(chat.last_user_message), chat.max_tokens)
    reservation = reserve(request, bearer.email, chat)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(quota.clock())
    if chat.stream:
        return await _stream(request, quota, chat, reservation, words, finish_reason, completion_id)
    balance_after = reservation.settle(chat.model.cost(chat.prompt_tokens, len(words)))
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model.id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(chat.prompt_tokens, len(words)),
            "quota": quota_block(reservation, balance_after),
        }
    )


def _event(payload: object) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _stream(
    request: web.Request,
    quota: MockQuota,
    chat: ChatRequest,
    reservation: Reservation,
    words: list[str],
    finish_reason: str,
    completion_id: str,
) -> web.StreamResponse:
    envelope = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(quota.clock()),
        "model": chat.model.id,
    }
    response = sse_response()
    quota.counters["chat.streamed"] += 1
    delay_s = quota.settings.chunk_delay_s
    sent = 0
    try:
        await response.prepare(request)
        for index, word in enumerate(words):
            if index and delay_s > 0:
                await asyncio.sleep(delay_s)
            delta = (
                {"role": "assistant", "content": word} if index == 0 else {"content": f" {word}"}
            )
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            await response.write(_event({**envelope, "choices": [choice]}))
            sent += 1
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        balance_after = reservation.settle(chat.model.cost(chat.prompt_tokens, sent))
        final = {
            **envelope,
            "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}],
            "usage": _usage(chat.prompt_tokens, sent),
            "quota": quota_block(reservation, balance_after),
        }
        await response.write(_event(final))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the finally block bills what it received
    finally:
        if reservation.charged is None:
            quota.counters["chat.stream_aborted"] += 1
            reservation.settle(chat.model.cost(chat.prompt_tokens, sent))
    return response
