"""``/auth/quota/widget.js``: served from the package, cacheable, revalidated with its ETag."""

from __future__ import annotations

from sidecar.routes.widget import widget_source
from tests.integration.conftest import Stack


async def test_the_widget_is_served_as_javascript_with_an_etag(stack: Stack) -> None:
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/widget.js")
    assert resp.status == 200
    assert resp.content_type == "text/javascript"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "max-age=" in resp.headers["Cache-Control"]
    body = await resp.read()
    assert body == widget_source()
    assert b'customElements.define("quota-wallet"' in body
    assert b'customElements.define("quota-buy-credits"' in body


async def test_a_revalidation_with_the_etag_is_a_304_without_a_body(stack: Stack) -> None:
    first = await stack.browser.get(f"{stack.public_url}/auth/quota/widget.js")
    etag = first.headers["ETag"]
    again = await stack.browser.get(
        f"{stack.public_url}/auth/quota/widget.js", headers={"If-None-Match": etag}
    )
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag


async def test_the_widget_needs_no_sign_in_and_is_not_proxied_to_the_app(stack: Stack) -> None:
    stack.browser.sign_out(stack.public_url)
    resp = await stack.browser.get(f"{stack.public_url}/auth/quota/widget.js")
    assert resp.status == 200
    assert not any(r.path_qs.startswith("/auth/quota/") for r in stack.upstream.requests)
