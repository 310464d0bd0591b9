"""The HTML of a checkout session: the page that pays or cancels it, and the pages that refuse.

Same frame and headers as the consent page (no scripts, nothing loaded, never framed). Stable
element ids (``pay``, ``cancel``) let browser tests drive it; each button is its own POST form,
so the page works without JavaScript.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

from .checkouts import Checkout
from .consent_page import html_response, page


def checkout_page(checkout: Checkout) -> web.Response:
    package = checkout.package
    path = f"/checkout/{escape(checkout.id)}"
    body = (
        f"<h1>Buy {escape(package.name)} credits</h1>"
        "<dl>"
        f"<dt>Package</dt><dd>{escape(package.name)}</dd>"
        f"<dt>Credits</dt><dd>{package.credits:,}</dd>"
        f"<dt>Price</dt><dd>{escape(package.price)} {escape(package.currency.upper())}</dd>"
        f"<dt>Wallet</dt><dd>{escape(checkout.email)}</dd>"
        "</dl>"
        '<div class="buttons">'
        f'<form method="post" action="{path}/pay">'
        f'<button type="submit" id="pay">Pay {escape(package.price)}</button></form>'
        f'<form method="post" action="{path}/cancel">'
        '<button type="submit" id="cancel">Cancel</button></form>'
        "</div>"
        '<p class="note">Local Quota emulator: no card is asked and nothing is charged.</p>'
    )
    return html_response(page(f"Checkout: {package.name}", body))


def refusal_page(title: str, message: str, *, status: int) -> web.Response:
    """A checkout that cannot be paid (unknown, expired, already paid or canceled)."""
    body = f'<h1>{escape(title)}</h1><p class="error" role="alert">{escape(message)}</p>'
    return html_response(page(title, body), status=status)
