"""Logging: JSON lines on stdout, a request id per line, and no credential ever written.

``configure()`` is called once by the CLI; importing this module changes nothing. The redaction
runs in the handler's formatter, after the message is rendered, so it catches a token however it
got there (an f-string, an exception, an ``%s`` argument).
"""

from __future__ import annotations

import contextvars
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
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9_\-.~+/=]+"),
    # OAuth parameters in URLs, forms and JSON.
    re.compile(
        r"(?i)\b(code|state|code_verifier|refresh_token|access_token|client_secret|token|key|api_key)"
        r"(=|\"\s*:\s*\"|':\s*')[^&\s\"',;]+"
    ),
    # Cookie and Authorization header values.
    re.compile(r"(?i)\b(cookie|set-cookie|authorization)(\"?\s*[:=]\s*\"?)[^\"\n]+"),
]


def redact(text: str) -> str:
    """Mask every credential-shaped run in ``text``, keeping what kind of thing it was."""
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}***", text)
    text = _PATTERNS[1].sub(lambda m: f"{m.group(1)} ***", text)
    text = _PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return _PATTERNS[3].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class JsonFormatter(logging.Formatter):
    _SKIP = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in JsonFormatter._SKIP and key != "request_id" and not key.startswith("_")
        )
        line = super().format(record)
        return redact(f"{line} {extras}" if extras else line)


def configure(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access logger writes the request line with its query (OAuth codes); ours
    # replaces it, so keep the library's quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
