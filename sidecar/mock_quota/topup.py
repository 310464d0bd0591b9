"""Buying credits: the package list, the checkout API, and the checkout page's Pay and Cancel.

    GET  /v1/packages               no auth -> {"object": "list", "data": [package, ...]}
    POST /api/payments/checkout     user token with credits.read,
                                    {package_id, success_url, cancel_url}
                                    -> {"id": "cs_…", "url": "<origin>/checkout/cs_…", "expires_at"}
    GET  /checkout/{id}             the page: package, credits, price, Pay and Cancel
    POST /checkout/{id}/pay         credit the creator's wallet once, send balance.updated,
                                    303 to success_url?checkout_session=cs_…
    POST /checkout/{id}/cancel      mark it canceled, 303 to cancel_url

The API answers in Quota's JSON error shape (400 ``invalid_package`` or ``invalid_request``, 401,
403); the browser routes answer with pages: 404 unknown, 409 already paid or canceled, 410
expired.
"""

from __future__ import annotations

from aiohttp import web

from . import events
from .bearer import require_bearer
from .body import json_object
from .checkout_page import checkout_page, refusal_page
from .checkouts import PACKAGES, Checkout, find_package
from .clients import append_query, is_absolute_http_url
from .errors import ApiError
from .oidc import issuer
from .scopes import CREDITS_READ
from .state import MOCK_QUOTA_KEY, MockQuota
from .webhooks import WEBHOOKS_KEY


async def packages(request: web.Request) -> web.Response:
    request.app[MOCK_QUOTA_KEY].counters["packages"] += 1
    return web.json_response({"object": "list", "data": [p.to_json() for p in PACKAGES]})


def _url_problem(body: dict[str, object], name: str) -> str | None:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        return f"{name} is required"
    if not is_absolute_http_url(value):
        return f"{name} must be an absolute http(s) URL"
    return None


async def create_checkout(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    bearer = require_bearer(request, CREDITS_READ)
    body = await json_object(request)
    package_id = body.get("package_id")
    if not isinstance(package_id, str) or not package_id:
        raise ApiError(400, "invalid_request", "package_id is required.")
    package = find_package(package_id)
    if package is None:
        raise ApiError(
            400,
            "invalid_package",
            f"Unknown package {package_id!r}; GET /v1/packages lists the available ones.",
        )
    problems = [p for p in (_url_problem(body, n) for n in ("success_url", "cancel_url")) if p]
    if problems:
        raise ApiError(400, "invalid_request", "; ".join(problems) + ".")
    checkout = quota.checkouts.create(
        package=package,
        email=bearer.email,
        client_id=bearer.client_id,
        success_url=str(body["success_url"]),
        cancel_url=str(body["cancel_url"]),
    )
    quota.counters["checkout.created"] += 1
    return web.json_response(
        {
            "id": checkout.id,
            "url": f"{issuer(request)}/checkout/{checkout.id}",
            "expires_at": int(checkout.expires_at),
        }
    )


def _not_found() -> web.Response:
    return refusal_page("Checkout not found", "No checkout has this id.", status=404)


def _already_paid() -> web.Response:
    return refusal_page(
        "Already paid", "This checkout was paid; its credits are in the wallet.", status=409
    )


def _refusal(quota: MockQuota, checkout: Checkout | None) -> web.Response | None:
    """The page that says why ``checkout`` cannot be paid, or None when it can."""
    if checkout is None:
        return _not_found()
    if checkout.status == "paid":
        return _already_paid()
    if checkout.status == "canceled":
        return refusal_page(
            "Checkout canceled", "This checkout was canceled; start a new one.", status=409
        )
    if quota.checkouts.expired(checkout):
        return refusal_page("Checkout expired", "This checkout has expired.", status=410)
    return None


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


async def show_checkout(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    checkout = quota.checkouts.get(request.match_info["checkout_id"])
    refused = _refusal(quota, checkout)
    if refused is not None or checkout is None:
        return refused or _not_found()
    return checkout_page(checkout)


async def pay(request: web.Request) -> web.Response:
    quota = request.app[MOCK_QUOTA_KEY]
    checkout = quota.checkouts.get(request.match_info["checkout_id"])
    refused = _refusal(quota, checkout)
    if refused is not None or checkout is None:
        return refused or _not_found()
    checkout.status = "paid"
    balance = quota.wallets.adjust(checkout.email, checkout.package.credits)
    quota.counters["checkout.paid"] += 1
    events.balance_updated(request.app[WEBHOOKS_KEY], checkout.email, balance)
    return _see_other(append_query(checkout.success_url, {"checkout_session": checkout.id}))


async def cancel(request: web.Request) -> web.Response:
    """Back to ``cancel_url``; a paid session is refused, anything else may be left again."""
    quota = request.app[MOCK_QUOTA_KEY]
    checkout = quota.checkouts.get(request.match_info["checkout_id"])
    if checkout is None:
        return _not_found()
    if checkout.status == "paid":
        return _already_paid()
    if checkout.status == "open":
        checkout.status = "canceled"
        quota.counters["checkout.canceled"] += 1
    return _see_other(checkout.cancel_url)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/packages", packages, allow_head=False),
        web.post("/api/payments/checkout", create_checkout),
        web.get("/checkout/{checkout_id}", show_checkout, allow_head=False),
        web.post("/checkout/{checkout_id}/pay", pay),
        web.post("/checkout/{checkout_id}/cancel", cancel),
    ]
