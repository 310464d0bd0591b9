"""The Quota emulator's top-ups: the package list, checkout sessions, and the page that pays them."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.mock_quota import MockQuota, create_app
from tests.support import FakeClock

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Http = TestClient[Any, Any]

CLIENT_ID = "quota_client_test"
EMAIL = "alice@example.com"
SUCCESS_URL = "https://app.example/billing?tab=credits"
CANCEL_URL = "https://app.example/billing"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quota(clock: FakeClock) -> MockQuota:
    state = MockQuota(clock=clock)
    state.register_client(
        name="Demo", redirect_uris=["https://app.example/cb"], client_id=CLIENT_ID
    )
    return state


@pytest.fixture
async def http(aiohttp_client: ClientFactory, quota: MockQuota) -> Http:
    return await aiohttp_client(create_app(quota))


def token_for(quota: MockQuota, email: str = EMAIL, scope: str = "credits.read") -> dict[str, str]:
    tokens = quota.issue_grant(CLIENT_ID, email, scope=scope)
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def checkout_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "package_id": "pkg_starter",
        "success_url": SUCCESS_URL,
        "cancel_url": CANCEL_URL,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def create_checkout(http: Http, quota: MockQuota, email: str = EMAIL) -> dict[str, Any]:
    resp = await http.post(
        "/api/payments/checkout", json=checkout_body(), headers=token_for(quota, email)
    )
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


class Forms(HTMLParser):
    """The action of each POST form on a page, keyed by the id of the button it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: dict[str, str] = {}
        self._action = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and a.get("method") == "post":
            self._action = a.get("action") or ""
        elif tag == "button" and a.get("id"):
            self.actions[a["id"] or ""] = self._action


async def page_actions(http: Http, checkout: dict[str, Any]) -> dict[str, str]:
    resp = await http.get(checkout["url"].removeprefix(str(http.make_url(""))))
    assert resp.status == 200
    forms = Forms()
    forms.feed(await resp.text())
    return forms.actions


async def test_packages_are_listed_without_a_token(http: Http) -> None:
    resp = await http.get("/v1/packages")
    body = await resp.json()
    assert resp.status == 200
    assert body["object"] == "list"
    assert len(body["data"]) == 3
    assert body["data"][0] == {
        "id": "pkg_starter",
        "name": "Starter",
        "credits": 5_000_000,
        "price_cents": 500,
        "currency": "usd",
    }
    assert "pkg_pro" in {p["id"] for p in body["data"]}
    assert all(p["credits"] > 0 and p["price_cents"] > 0 for p in body["data"])


async def test_a_checkout_is_created_with_a_page_on_the_emulators_own_origin(
    http: Http, quota: MockQuota, clock: FakeClock
) -> None:
    body = await create_checkout(http, quota)
    assert re.fullmatch(r"cs_[0-9a-f]{32}", body["id"])
    assert body["url"] == str(http.make_url(f"/checkout/{body['id']}"))
    assert body["expires_at"] == int(clock()) + 24 * 3600
    assert quota.checkouts.sessions[body["id"]].email == EMAIL
    assert quota.counters["checkout.created"] == 1


async def test_the_checkout_page_shows_the_package_and_pay_and_cancel_forms(
    http: Http, quota: MockQuota
) -> None:
    checkout = await create_checkout(http, quota)
    resp = await http.get(f"/checkout/{checkout['id']}")
    text = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "Starter" in text
    assert "5,000,000" in text
    assert "$5.00" in text
    assert EMAIL in text
    assert await page_actions(http, checkout) == {
        "pay": f"/checkout/{checkout['id']}/pay",
        "cancel": f"/checkout/{checkout['id']}/cancel",
    }


async def test_paying_credits_the_creators_wallet_once_and_returns_to_success_url(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 100)
    quota.set_balance("bob@example.com", 7)
    checkout = await create_checkout(http, quota)
    pay = (await page_actions(http, checkout))["pay"]

    resp = await http.post(pay, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == f"{SUCCESS_URL}&checkout_session={checkout['id']}"
    assert quota.balance(EMAIL) == 100 + 5_000_000
    assert quota.balance("bob@example.com") == 7

    again = await http.post(pay, allow_redirects=False)
    assert again.status == 409
    assert "Already paid" in await again.text()
    assert quota.balance(EMAIL) == 100 + 5_000_000
    assert (await http.get(f"/checkout/{checkout['id']}")).status == 409
    assert quota.counters["checkout.paid"] == 1


async def test_success_url_without_a_query_gets_one_before_its_fragment(
    http: Http, quota: MockQuota
) -> None:
    resp = await http.post(
        "/api/payments/checkout",
        json=checkout_body(success_url="https://app.example/done#top"),
        headers=token_for(quota),
    )
    checkout = await resp.json()
    paid = await http.post(f"/checkout/{checkout['id']}/pay", allow_redirects=False)
    assert paid.headers["Location"] == (
        f"https://app.example/done?checkout_session={checkout['id']}#top"
    )


async def test_cancel_returns_to_cancel_url_credits_nothing_and_cannot_be_paid_after(
    http: Http, quota: MockQuota
) -> None:
    quota.set_balance(EMAIL, 100)
    checkout = await create_checkout(http, quota)
    cancel = (await page_actions(http, checkout))["cancel"]

    resp = await http.post(cancel, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == CANCEL_URL
    again = await http.post(cancel, allow_redirects=False)
    assert (again.status, again.headers["Location"]) == (303, CANCEL_URL)
    pay = await http.post(f"/checkout/{checkout['id']}/pay", allow_redirects=False)
    assert pay.status == 409
    assert quota.balance(EMAIL) == 100
    assert quota.counters["checkout.canceled"] == 1


async def test_a_paid_checkout_cannot_be_canceled(http: Http, quota: MockQuota) -> None:
    checkout = await create_checkout(http, quota)
    await http.post(f"/checkout/{checkout['id']}/pay", allow_redirects=False)
    resp = await http.post(f"/checkout/{checkout['id']}/cancel", allow_redirects=False)
    assert resp.status == 409


async def test_an_expired_checkout_cannot_be_paid(
    http: Http, quota: MockQuota, clock: FakeClock
) -> None:
    quota.set_balance(EMAIL, 100)
    checkout = await create_checkout(http, quota)
    clock.advance(24 * 3600)
    assert (await http.get(f"/checkout/{checkout['id']}")).status == 410
    assert (await http.post(f"/checkout/{checkout['id']}/pay")).status == 410
    assert quota.balance(EMAIL) == 100


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_unknown_checkout_is_a_404_page(http: Http, method: str) -> None:
    path = "/checkout/cs_nope" if method == "GET" else "/checkout/cs_nope/pay"
    resp = await http.request(method, path, allow_redirects=False)
    assert resp.status == 404
    assert resp.content_type == "text/html"


async def test_the_checkout_page_escapes_the_account_it_shows(http: Http, quota: MockQuota) -> None:
    checkout = await create_checkout(http, quota, email="<b>mallory</b>@example.com")
    text = await (await http.get(f"/checkout/{checkout['id']}")).text()
    assert "<b>mallory" not in text
    assert "&lt;b&gt;mallory&lt;/b&gt;@example.com" in text


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(checkout_body(package_id="pkg_nope"), "invalid_package", id="unknown package"),
        pytest.param(checkout_body(package_id=None), "invalid_request", id="no package"),
        pytest.param(checkout_body(success_url=None), "invalid_request", id="no success_url"),
        pytest.param(checkout_body(cancel_url="/billing"), "invalid_request", id="relative url"),
        pytest.param(
            checkout_body(success_url="javascript:alert(1)"), "invalid_request", id="not http"
        ),
        pytest.param(checkout_body(cancel_url=42), "invalid_request", id="not a string"),
    ],
)
async def test_a_bad_checkout_request_is_400_in_quota_error_shape(
    http: Http, quota: MockQuota, body: dict[str, object], code: str
) -> None:
    resp = await http.post("/api/payments/checkout", json=body, headers=token_for(quota))
    error = (await resp.json())["error"]
    assert resp.status == 400
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert not quota.checkouts.sessions


async def test_a_checkout_needs_a_token(http: Http, quota: MockQuota) -> None:
    resp = await http.post("/api/payments/checkout", json=checkout_body())
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"
    assert not quota.checkouts.sessions


async def test_a_checkout_needs_the_credits_read_scope(http: Http, quota: MockQuota) -> None:
    resp = await http.post(
        "/api/payments/checkout",
        json=checkout_body(),
        headers=token_for(quota, scope="credits.spend"),
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "insufficient_scope"
    assert not quota.checkouts.sessions
