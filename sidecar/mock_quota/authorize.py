"""``/oauth/authorize``: check the request, ask the user on the consent page, issue a code.

What goes wrong decides where the answer goes (RFC 6749 §4.1.2.1):

- unknown ``client_id`` or a ``redirect_uri`` not registered byte for byte: a 400 HTML page,
  never a redirect (the target cannot be trusted);
- anything else (``response_type``, missing ``state``, PKCE, scopes, a refusal): a 302 back to
  ``redirect_uri`` with ``error=`` and the caller's ``state``.

The POST from the consent page carries every parameter in hidden fields; it is validated again
from scratch, as if it came from anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from .clients import Client, append_query
from .consent_page import DEFAULT_EMAIL, consent_page, error_page, html_response
from .scopes import format_scope, parse_scope
from .state import MOCK_QUOTA_KEY, MockQuota

PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)
# An S256 challenge is base64url(sha256(...)) without padding: always 43 characters.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}")


@dataclass(frozen=True)
class AuthorizeRequest:
    """A request that passed every check; ``params`` are its canonical hidden fields."""

    client: Client
    redirect_uri: str
    state: str
    code_challenge: str
    scopes: tuple[str, ...]
    params: dict[str, str]


def redirect_back(uri: str, query: Mapping[str, str | None]) -> web.Response:
    """302 to ``uri`` with ``query`` appended, keeping any query ``uri`` already has."""
    return web.Response(
        status=302, headers={"Location": append_query(uri, query), "Cache-Control": "no-store"}
    )


def _single_values(source: MultiMapping[str | object]) -> tuple[dict[str, str], set[str]]:
    """The string value of each authorize parameter, and the names that were repeated."""
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for name in PARAMS:
        found = [v for v in source.getall(name, []) if isinstance(v, str)]
        if len(found) > 1:
            repeated.add(name)
        if found:
            values[name] = found[0]
    return values, repeated


def check_request(
    quota: MockQuota, source: MultiMapping[str | object]
) -> AuthorizeRequest | web.Response:
    """The validated request, or the response that refuses it."""
    params, repeated = _single_values(source)
    client = quota.clients.get(params.get("client_id", ""))
    if client is None or "client_id" in repeated:
        page = error_page("invalid_client", "No app is registered with this client_id.")
        return html_response(page, status=400)
    redirect_uri = params.get("redirect_uri", "")
    if "redirect_uri" in repeated or not client.has_redirect_uri(redirect_uri):
        page = error_page(
            "invalid_redirect_uri",
            f"The redirect_uri is not one registered for {client.name} (exact match required).",
        )
        return html_response(page, status=400)
    state = params.get("state")

    def refuse(error: str, description: str) -> web.Response:
        return redirect_back(
            redirect_uri, {"error": error, "error_description": description, "state": state}
        )

    if repeated:
        return refuse("invalid_request", f"Repeated parameters: {', '.join(sorted(repeated))}.")
    if params.get("response_type") != "code":
        return refuse("unsupported_response_type", "Only response_type=code is supported.")
    if not state:
        return refuse("invalid_request", "state is required.")
    if params.get("code_challenge_method") != "S256":
        return refuse("invalid_request", "PKCE is required: code_challenge_method must be S256.")
    challenge = params.get("code_challenge", "")
    if not _S256_CHALLENGE.fullmatch(challenge):
        return refuse("invalid_request", "code_challenge must be a 43-character S256 challenge.")
    scopes = parse_scope(params.get("scope"))
    if not scopes:
        return refuse("invalid_scope", "scope is required.")
    unknown = client.unknown_scopes(format_scope(scopes))
    if unknown:
        return refuse("invalid_scope", f"Scopes not allowed for this app: {' '.join(unknown)}.")
    canonical = {name: params[name] for name in PARAMS}
    return AuthorizeRequest(client, redirect_uri, state, challenge, scopes, canonical)


def approve(quota: MockQuota, request: AuthorizeRequest, email: str) -> web.Response:
    code = quota.grants.create_code(
        client_id=request.client.client_id,
        email=email,
        scope=format_scope(request.scopes),
        redirect_uri=request.redirect_uri,
        code_challenge=request.code_challenge,
        ttl_s=quota.settings.code_ttl_s,
    )
    quota.counters["authorize.approved"] += 1
    return redirect_back(request.redirect_uri, {"code": code, "state": request.state})


def _consent(request: AuthorizeRequest, *, email: str, error: str | None = None) -> web.Response:
    page = consent_page(
        app_name=request.client.name,
        scopes=request.scopes,
        params=request.params,
        email=email,
        error=error,
    )
    return html_response(page, status=400 if error else 200)


async def authorize_get(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    checked = check_request(quota, request.query)
    if isinstance(checked, web.Response):
        return checked
    auto_email = quota.settings.auto_approve_email
    if auto_email:
        return approve(quota, checked, auto_email.strip().lower())
    return _consent(checked, email=DEFAULT_EMAIL)


async def authorize_post(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    form = await request.post()
    checked = check_request(quota, form)
    if isinstance(checked, web.Response):
        return checked
    decision = form.get("decision")
    if decision == "deny":
        quota.counters["authorize.denied"] += 1
        return redirect_back(
            checked.redirect_uri,
            {
                "error": "access_denied",
                "error_description": "The user denied the request.",
                "state": checked.state,
            },
        )
    if decision != "approve":
        return redirect_back(
            checked.redirect_uri,
            {
                "error": "invalid_request",
                "error_description": "decision must be approve or deny.",
                "state": checked.state,
            },
        )
    email = form.get("email")
    email = email.strip().lower() if isinstance(email, str) else ""
    if not _EMAIL.fullmatch(email):
        return _consent(checked, email=email, error="Enter the email of a Quota account.")
    return approve(quota, checked, email)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/oauth/authorize", authorize_get, allow_head=False),
        web.post("/oauth/authorize", authorize_post),
    ]
