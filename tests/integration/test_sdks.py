"""Stock SDKs against the internal listener: the OpenAI and Anthropic Python clients, unpatched.

A host app points its SDK's base URL at the sidecar, names the user in ``X-Quota-User`` and puts
anything in ``api_key``: the sidecar swaps in the user's Quota token. Quota's errors and the
sidecar's own must surface as the SDKs' usual exception classes, with Quota's ``code``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from tests.integration.conftest import Stack

USER = "alice"
EMAIL = "alice@example.com"
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku"
PROMPT = "write one line about wallets"
SDK_TIMEOUT_S = 10.0


@pytest.fixture
async def connected(stack: Stack) -> Stack:
    """The stack with alice's wallet connected through the browser round-trip."""
    landed = await stack.connect(USER, EMAIL)
    assert landed.status == 200, await landed.text()
    stack.quota.set_balance(EMAIL, 1_000_000)
    return stack


@pytest.fixture
async def openai_client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=stack.internal_url + "/v1",
        api_key="unused",
        default_headers={"X-Quota-User": USER},
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    ) as client:
        yield client


@pytest.fixture
async def anthropic_client(stack: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=stack.internal_url,
        api_key="unused",
        default_headers={"X-Quota-User": USER},
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    ) as client:
        yield client


def last_forwarded_authorization(stack: Stack, path: str) -> str:
    sent = [r for r in stack.quota.requests if r.path == path]
    assert sent, f"nothing reached Quota's {path}"
    return next(v for k, v in sent[-1].headers.items() if k.lower() == "authorization")


# --- OpenAI --------------------------------------------------------------------------------


async def test_openai_sdk_chat_completion_is_answered_and_billed_to_the_users_wallet(
    connected: Stack, openai_client: openai.AsyncOpenAI
) -> None:
    completion = await openai_client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
    )
    assert completion.object == "chat.completion"
    content = completion.choices[0].message.content
    assert content is not None
    assert content.startswith(f"Echo from Quota: {PROMPT}")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(content.split())
    # Quota's extra block passes through the sidecar and the SDK untouched.
    quota_block = (completion.model_extra or {})["quota"]
    assert quota_block["balance_before"] == 1_000_000
    assert connected.quota.balance(EMAIL) == 1_000_000 - quota_block["credits_used"]
    authorization = last_forwarded_authorization(connected, "/v1/chat/completions")
    assert authorization.startswith("Bearer quota_token_")


async def test_openai_sdk_streams_chunks_and_the_final_quota_block(
    connected: Stack, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    pieces: list[str] = []
    finish_reasons: list[str | None] = []
    extras: list[dict[str, object]] = []
    async with stream:
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            pieces.append(chunk.choices[0].delta.content or "")
            finish_reasons.append(chunk.choices[0].finish_reason)
            extras.append(chunk.model_extra or {})
    text = "".join(pieces)
    assert text.startswith(f"Echo from Quota: {PROMPT}")
    assert len([p for p in pieces if p]) == len(text.split()), "one chunk per word"
    assert finish_reasons[-1] == "stop"
    quota_block = extras[-1]["quota"]
    assert isinstance(quota_block, dict)
    assert connected.quota.balance(EMAIL) == 1_000_000 - quota_block["credits_used"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_openai_sdk_raises_api_status_error_402_with_quotas_insufficient_credits(
    connected: Stack, openai_client: openai.AsyncOpenAI, stream: bool
) -> None:
    connected.quota.set_balance(EMAIL, 0)
    with pytest.raises(openai.APIStatusError) as caught:
        await openai_client.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}], stream=stream
        )
    error = caught.value
    assert error.status_code == 402
    assert error.code == "insufficient_credits"
    assert isinstance(error.body, dict)
    assert error.body["code"] == "insufficient_credits"
    assert connected.quota.balance(EMAIL) == 0


async def test_openai_sdk_raises_authentication_error_for_a_user_with_no_wallet(
    connected: Stack,
) -> None:
    async with openai.AsyncOpenAI(
        base_url=connected.internal_url + "/v1",
        api_key="unused",
        default_headers={"X-Quota-User": "nobody-connected"},
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(
                model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
            )
    assert caught.value.status_code == 401
    assert caught.value.code == "wallet_not_connected"
    assert not [r for r in connected.quota.requests if r.path == "/v1/chat/completions"]


async def test_openai_sdk_raises_bad_request_error_when_the_app_names_no_user(
    connected: Stack,
) -> None:
    async with openai.AsyncOpenAI(
        base_url=connected.internal_url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    ) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=OPENAI_MODEL, messages=[{"role": "user", "content": PROMPT}]
            )
    assert caught.value.code == "identity_missing"


async def test_openai_sdk_lists_models_through_the_sidecar(
    connected: Stack, openai_client: openai.AsyncOpenAI
) -> None:
    models = [model.id async for model in openai_client.models.list()]
    assert {"gpt-4o-mini", "claude-3-5-haiku"} <= set(models)


# --- Anthropic -----------------------------------------------------------------------------


async def test_anthropic_sdk_message_is_answered_and_billed_to_the_users_wallet(
    connected: Stack, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    message = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=[{"role": "user", "content": PROMPT}]
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert block.type == "text"
    assert block.text.startswith(f"Echo from Quota: {PROMPT}")
    assert message.usage.output_tokens == len(block.text.split())
    quota_block = (message.model_extra or {})["quota"]
    assert connected.quota.balance(EMAIL) == 1_000_000 - quota_block["credits_used"]
    authorization = last_forwarded_authorization(connected, "/v1/messages")
    assert authorization.startswith("Bearer quota_token_")


async def test_anthropic_sdk_streams_text_deltas_and_skips_quotas_usage_event(
    connected: Stack, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    deltas: list[str] = []
    async with anthropic_client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        async for text in stream.text_stream:
            deltas.append(text)
        final = await stream.get_final_message()
    text = "".join(deltas)
    assert text.startswith(f"Echo from Quota: {PROMPT}")
    assert len(deltas) == len(text.split()), "one delta per word"
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(deltas)
    assert connected.quota.balance(EMAIL) < 1_000_000


async def test_anthropic_sdk_raw_event_stream_ends_with_message_stop(
    connected: Stack, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    stream = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=256,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
    )
    kinds: list[str] = []
    async with stream:
        async for event in stream:
            kinds.append(event.type)
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "quota_usage" not in kinds  # Quota's own event is not one the SDK knows


async def test_anthropic_sdk_raises_api_status_error_402_with_quotas_insufficient_credits(
    connected: Stack, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    connected.quota.set_balance(EMAIL, 0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await anthropic_client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=256, messages=[{"role": "user", "content": PROMPT}]
        )
    assert caught.value.status_code == 402
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "insufficient_credits"


async def test_anthropic_sdk_raises_authentication_error_for_a_user_with_no_wallet(
    connected: Stack,
) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=connected.internal_url,
        api_key="unused",
        default_headers={"X-Quota-User": "nobody-connected"},
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    ) as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(
                model=ANTHROPIC_MODEL,
                max_tokens=256,
                messages=[{"role": "user", "content": PROMPT}],
            )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "wallet_not_connected"


async def test_anthropic_sdk_api_key_header_does_not_reach_quota(
    connected: Stack, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=8, messages=[{"role": "user", "content": PROMPT}]
    )
    sent = [r for r in connected.quota.requests if r.path == "/v1/messages"][-1]
    assert "x-api-key" not in {name.lower() for name in sent.headers}
