"""Logging: JSON lines on stdout, a request id per line, and no credential ever written.

``configure()`` is called once by the CLI; importing this module changes nothing. The redaction
runs in the handler's formatter, after the message is rendered, so it catches a token however it
got there (an f-string, an exception, an ``%s`` argument).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
import sys
import time
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_PATTERNS = [
    # Quota credentials by their documented prefixes.
    re.compile(
        r"\b(quota_token_|quota_refresh_|quota_secret_|sk-quota-|sess_|whsec_)[A-Za-z0-9_\-.~+/=]+"
    ),
    # Any bearer or basic credential, whatever it looks like.
    re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9_\-.~+/=]+", re.IGNORECASE),
    # OAuth parameters in URLs, forms and JSON.
    re.compile(
        r"\b(code|state|code_verifier|refresh_token|access_token|client_secret|token|key|api_key)"
        r"(=|\"\s*:\s*\"|':\s*')[^&\s\"',;]+",
        re.IGNORECASE,
    ),
    # Cookie and Authorization header values.
    re.compile(r"\b(cookie|set-cookie|authorization)(\"?\s*[:=]\s*\"?)[^\"\n]+", re.IGNORECASE),
]
# Every pattern starts with one of these words, in any case: ASCII text holding none of them
# has nothing to mask, and most text (paths, request ids, methods) holds none. Text that is not
# ASCII always goes through the patterns: ignoring case, they match letters that ``str.lower``
# does not fold (the long s for ``s``, the Kelvin sign for ``k``).
_KEYWORDS = (
    "quota",
    "sess_",
    "whsec_",
    "bearer",
    "basic",
    "code",
    "state",
    "token",
    "key",
    "secret",
    "cookie",
    "authorization",
)


def redact(text: str) -> str:
    """Mask every credential-shaped run in ``text``, keeping what kind of thing it was."""
    if text.isascii():
        lowered = text.lower()
        for word in _KEYWORDS:
            if word in lowered:
                break
        else:
            return text
    return _mask(text)


def _mask(text: str) -> str:
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}***", text)
    text = _PATTERNS[1].sub(lambda m: f"{m.group(1)} ***", text)
    text = _PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return _PATTERNS[3].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


# A record whose fields are already safe to write carries them under this attribute: numbers,
# fixed names and strings that went through ``redact`` one by one (the access log's line). The
# formatters then skip the whole-line redaction, which costs more than everything else together.
SAFE_FIELDS = "_safe_fields"


def _timestamp(record: logging.LogRecord) -> str:
    return _second(int(record.created)) + f".{int(record.msecs):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """The timestamp down to the second: lines written in the same second share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


# ``json.dumps`` with options builds an encoder per call; the lines share this one.
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    _SKIP = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        safe: dict[str, Any] | None = getattr(record, SAFE_FIELDS, None)
        if safe is not None and not record.exc_info:
            return _JSON.encode(
                {
                    "ts": _timestamp(record),
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "msg": record.getMessage(),
                    **safe,
                }
            )
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._SKIP and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(_JSON.encode(entry))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        safe: dict[str, Any] = getattr(record, SAFE_FIELDS, None) or {}
        if not hasattr(record, "request_id"):
            record.request_id = safe.get("request_id") or request_id.get()
        fields = {
            key: value
            for key, value in record.__dict__.items()
            if key not in JsonFormatter._SKIP and not key.startswith("_")
        }
        fields.update(safe)
        fields.pop("request_id", None)
        extras = " ".join(f"{key}={value}" for key, value in fields.items())
        line = super().format(record)
        return redact(f"{line} {extras}" if extras else line)


class LoopFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line at once but flushes once per event-loop turn: a burst of access lines
    becomes one ``write`` to stdout instead of one each. Outside a loop it flushes every line.
    """

    _flush_pending = False

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        super().flush()


class WorkerLabel(logging.Filter):
    """Adds ``worker`` (the index under ``run --workers N``) to every line of this process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        safe: dict[str, Any] | None = getattr(record, SAFE_FIELDS, None)
        if safe is not None:
            safe["worker"] = self.index
        return True


def label_worker(index: int) -> None:
    """From now on, every line this process writes names its worker (call in the worker)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerLabel(index))


def configure(level: str = "info", fmt: str = "json") -> None:
    handler = LoopFlushedHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access logger writes the request line with its query (OAuth codes); ours
    # replaces it, so keep the library's quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
