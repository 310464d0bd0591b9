"""The models the emulator sells, their prices, and the deterministic replies it writes.

Prices are integer credits per token (1,000,000 credits = $1), set high enough that one short
demo chat costs about a cent and the balance visibly drops. A "token" is a whitespace-separated
word: crude, but predictable enough for tests to compute exact charges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str
    input_per_token: int
    output_per_token: int

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "model",
            "owned_by": self.owned_by,
            "pricing": {
                "input_per_token": self.input_per_token,
                "output_per_token": self.output_per_token,
            },
        }


MODELS: tuple[Model, ...] = (
    Model("gpt-4o-mini", "openai", 100, 400),
    Model("gpt-4o", "openai", 500, 2_000),
    Model("claude-3-5-haiku", "anthropic", 200, 800),
)

# How many words of the user's message the reply repeats, and the fixed sentence after them:
# a reply is 10 to 21 words.
ECHO_WORDS = 12
REPLY_PREFIX = "Echo from Quota:"
REPLY_TAIL = "This is a deterministic test reply."


def find_model(model_id: str) -> Model | None:
    return next((m for m in MODELS if m.id == model_id), None)


def count_tokens(texts: Iterable[str]) -> int:
    return sum(len(text.split()) for text in texts)


def reply_for(last_user_message: str) -> str:
    """``Echo from Quota: <first words of the message>. <fixed sentence>``."""
    words = last_user_message.split()
    echo = " ".join(words[:ECHO_WORDS]) if words else "(no message)"
    if len(words) > ECHO_WORDS:
        echo += "…"
    elif not echo.endswith((".", "!", "?")):
        echo += "."
    return f"{REPLY_PREFIX} {echo} {REPLY_TAIL}"


def reply_words(reply: str, max_tokens: int) -> tuple[list[str], str]:
    """The reply's words cut to ``max_tokens``, and the finish reason (``stop`` or ``length``)."""
    words = reply.split()
    if len(words) > max_tokens:
        return words[:max_tokens], "length"
    return words, "stop"
