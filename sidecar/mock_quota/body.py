"""Reading JSON request bodies, answering Quota's 400 ``invalid_request`` when they are wrong."""

from __future__ import annotations

from aiohttp import web

from .errors import ApiError


async def json_object(request: web.Request) -> dict[str, object]:
    """The body as a JSON object; ``ApiError`` 400 when it is not JSON or not an object."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "invalid_request", "The body must be JSON.") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The body must be a JSON object.")
    return body
