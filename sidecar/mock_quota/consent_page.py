"""The HTML the emulator shows a browser: the consent page and the authorize error page.

Self-contained (inline CSS, no scripts, no external assets); every echoed value is escaped.
Stable element ids (``email``, ``approve``, ``deny``) let browser tests drive the page. The
frame (``page``, ``html_response``) is shared with the checkout page (``checkout_page``).
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from aiohttp import web

from .scopes import describe

DEFAULT_EMAIL = "user@quota.local"

# Nothing on these pages loads or runs anything; they must not be framed (clickjacking).
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_CSS = """
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;background:#f3f4f8;color:#1d2233}
main{width:min(420px,92vw);background:#fff;border-radius:14px;padding:28px 30px;
  box-shadow:0 8px 30px rgba(20,25,60,.12)}
.brand{font-weight:700;letter-spacing:.02em;color:#5b4cdb;font-size:13px;text-transform:uppercase}
h1{font-size:21px;margin:6px 0 14px}
ul{padding:0;margin:0 0 18px;list-style:none}
li{padding:9px 12px;margin-bottom:6px;background:#f6f5ff;border-radius:8px}
li code{display:block;font-size:12px;color:#6b6f85}
label{display:block;font-weight:600;margin-bottom:6px}
input[type=email]{width:100%;padding:9px 11px;border:1px solid #c9cbe0;border-radius:8px;
  font:inherit;margin-bottom:18px}
.buttons{display:flex;gap:10px}
button{flex:1;padding:10px;border-radius:8px;font:inherit;font-weight:600;cursor:pointer}
.buttons form{flex:1;display:flex}
#approve,#pay{background:#5b4cdb;border:1px solid #5b4cdb;color:#fff}
#deny,#cancel{background:#fff;border:1px solid #c9cbe0;color:#1d2233}
dl{display:grid;grid-template-columns:auto 1fr;gap:6px 14px;margin:0 0 18px}
dt{color:#6b6f85}dd{margin:0;font-weight:600}
.error{background:#fdecec;color:#9b1c1c;padding:9px 12px;border-radius:8px;margin-bottom:14px}
.note{font-size:12px;color:#6b6f85;margin-top:16px}
"""


def page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><main><div class="brand">Quota</div>{body}</main></body></html>\n'
    )


def html_response(text: str, *, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", headers=_SECURITY_HEADERS
    )


def consent_page(
    *,
    app_name: str,
    scopes: tuple[str, ...],
    params: Mapping[str, str],
    email: str = DEFAULT_EMAIL,
    error: str | None = None,
) -> str:
    """The consent form; ``params`` ride along as hidden fields and are re-checked on POST."""
    items = "".join(
        f"<li>{escape(describe(scope))}<code>{escape(scope)}</code></li>" for scope in scopes
    )
    hidden = "".join(
        f'<input type="hidden" name="{escape(key)}" value="{escape(value)}">'
        for key, value in params.items()
    )
    notice = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        f"<h1><strong>{escape(app_name)}</strong> wants to use your Quota wallet</h1>"
        f"{notice}<p>It will be able to:</p><ul>{items}</ul>"
        '<form method="post" action="/oauth/authorize">'
        f"{hidden}"
        '<label for="email">Quota account</label>'
        f'<input type="email" id="email" name="email" value="{escape(email)}" required>'
        '<div class="buttons">'
        # Approve comes first: pressing Enter in the email field submits the first button.
        '<button type="submit" id="approve" name="decision" value="approve">Approve</button>'
        '<button type="submit" id="deny" name="decision" value="deny" formnovalidate>Deny</button>'
        "</div></form>"
        '<p class="note">Local Quota emulator: no password is asked; any email works.</p>'
    )
    return page(f"Authorize {app_name}", body)


def error_page(code: str, message: str) -> str:
    """Shown instead of redirecting when the redirect target itself cannot be trusted."""
    body = (
        "<h1>This authorization request cannot continue</h1>"
        f'<p class="error"><code>{escape(code)}</code></p><p>{escape(message)}</p>'
    )
    return page("Authorization error", body)
