"""The sidecar's error tree: every failure a client can see, with its status and stable code.

    SidecarError                      (500 internal_error)
    ├── ClientFault                   4xx: the caller can fix it
    │   ├── BadRequest                400 invalid_request
    │   │   ├── IdentityMissing       400 identity_missing
    │   │   ├── IdentityInvalid       400 identity_invalid
    │   │   ├── InvalidPath           400 invalid_path
    │   │   ├── BadRequestFraming     400 bad_request_framing
    │   │   ├── InvalidPackage        400 invalid_package
    │   │   └── WebhookStale          400 webhook_stale
    │   ├── NotSignedIn               401 not_signed_in
    │   ├── WalletNotConnected        401 wallet_not_connected
    │   ├── InvalidApiKey             401 invalid_api_key
    │   ├── WebhookSignatureInvalid   401 webhook_signature_invalid
    │   ├── ForbiddenOrigin           403 forbidden_origin
    │   ├── NotFound                  404 not_found
    │   ├── WebhooksNotConfigured     404 webhooks_not_configured
    │   ├── MethodNotAllowed          405 method_not_allowed
    │   ├── RequestBodyTimeout        408 request_body_timeout
    │   ├── RequestHeaderTimeout      408 request_header_timeout
    │   ├── PublicUrlUnknown          409 public_url_unknown
    │   ├── WebhookReplayed           409 webhook_replayed
    │   ├── PayloadTooLarge           413 payload_too_large
    │   ├── TooManyStreams            429 too_many_streams
    │   └── SpendLimitReached         429 spend_limit_reached
    └── ServiceFault                  5xx: ours or a dependency's
        ├── StoreUnavailable          503 store_unavailable
        ├── RefreshUnavailable        503 refresh_unavailable
        ├── QuotaUnavailable          502 quota_unavailable
        │   └── QuotaTimeout          504 quota_timeout
        ├── TopupUnavailable          502 topup_unavailable
        └── UpstreamUnavailable       502 upstream_unavailable
            └── UpstreamTimeout       504 upstream_timeout

Each error carries a public message safe to show anyone; details for operators go to the log
(``detail``), never into the response. Rendering lives in ``sidecar.middleware``.

``CallbackError`` is apart from the tree: it ends a browser OAuth round-trip with a redirect to
``after_error?quota_error=<code>`` instead of a JSON body.
"""

from __future__ import annotations

from typing import ClassVar


class SidecarError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    default_message: ClassVar[str] = (
        "The sidecar hit an unexpected error; the request id is in the log."
    )

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.retry_after_s = retry_after_s
        super().__init__(self.message if detail is None else f"{self.message} ({detail})")


class ClientFault(SidecarError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    default_message = "The request is not valid."


class BadRequest(ClientFault):
    pass


class IdentityMissing(BadRequest):
    code = "identity_missing"
    default_message = (
        "No user identity header on this request. The host app must name the user in the "
        "identity header (X-Quota-User by default) on every call to the internal listener."
    )


class IdentityInvalid(BadRequest):
    code = "identity_invalid"
    default_message = (
        "The user identity is not usable: it must be 1 to 256 visible characters, sent once."
    )


class InvalidPath(BadRequest):
    code = "invalid_path"
    default_message = "The request path is not allowed: it must not contain '..', '//' or '\\'."


class BadRequestFraming(BadRequest):
    """Refused by ``sidecar.protocol`` before any handler runs; the connection is then closed."""

    code = "bad_request_framing"
    default_message = (
        "The request could not be read safely: every line of its head must end in CRLF, its body "
        "must be framed by one Content-Length or by chunked Transfer-Encoding, and its request "
        "line and headers must be well-formed and within the size limits. The connection is closed."
    )


class InvalidPackage(BadRequest):
    code = "invalid_package"
    default_message = (
        "There is no top-up package with this id. List the packages with GET /auth/quota/packages."
    )


class WebhookStale(BadRequest):
    code = "webhook_stale"
    default_message = (
        "The webhook's created_at is too far from now (older than webhooks.max_age_s, or in the "
        "future). Check the clocks; Quota's retries of an old event are refused."
    )


class NotSignedIn(ClientFault):
    status = 401
    code = "not_signed_in"
    type = "authentication_error"
    default_message = "Sign in to the app first, then connect your Quota wallet."


class WalletNotConnected(ClientFault):
    status = 401
    code = "wallet_not_connected"
    type = "authentication_error"
    default_message = (
        "This user has not connected a Quota wallet, or the connection has ended. Connect it again."
    )


class InvalidApiKey(ClientFault):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"
    default_message = (
        "The internal API key is missing or wrong. Send it as 'Authorization: Bearer <key>' "
        "(the api_key of an OpenAI SDK)."
    )


class WebhookSignatureInvalid(ClientFault):
    status = 401
    code = "webhook_signature_invalid"
    type = "authentication_error"
    default_message = (
        "The X-Quota-Signature header is missing or does not match the body. Check that "
        "webhooks.secret is the whsec_ secret of this webhook in Quota."
    )


class ForbiddenOrigin(ClientFault):
    status = 403
    code = "forbidden_origin"
    type = "permission_error"
    default_message = (
        "This request came from another site and was refused. Send it from the app's own pages."
    )


class NotFound(ClientFault):
    status = 404
    code = "not_found"
    default_message = "There is nothing at this path."


class WebhooksNotConfigured(NotFound):
    code = "webhooks_not_configured"
    default_message = (
        "This sidecar does not receive Quota webhooks: set webhooks.secret (QUOTA_WEBHOOK_SECRET) "
        "to the whsec_ secret Quota shows for the webhook."
    )


class MethodNotAllowed(ClientFault):
    status = 405
    code = "method_not_allowed"
    default_message = "This path does not accept that HTTP method."


class RequestBodyTimeout(ClientFault):
    """A request body that stopped arriving: nothing came for ``limits.body_idle_timeout_s``."""

    status = 408
    code = "request_body_timeout"
    default_message = (
        "The request body stopped arriving for longer than limits.body_idle_timeout_s; the "
        "request was not completed. Send the body without long pauses."
    )


class RequestHeaderTimeout(ClientFault):
    """Sent by ``sidecar.protocol`` on a connection whose request head stalled; then closed."""

    status = 408
    code = "request_header_timeout"
    default_message = (
        "The request line and headers did not arrive within limits.header_timeout_s; the "
        "connection is closed. Send the whole head at once, then the body."
    )


class PublicUrlUnknown(ClientFault):
    status = 409
    code = "public_url_unknown"
    default_message = (
        "The sidecar does not know its public URL, so it cannot make a connect link outside a "
        "browser request. Set quota.redirect_uri (QUOTA_REDIRECT_URI) to the public callback "
        "URL, e.g. https://app.example.com/auth/quota/callback."
    )


class WebhookReplayed(ClientFault):
    status = 409
    code = "webhook_replayed"
    default_message = "This webhook event id was already received; it is not processed twice."


class PayloadTooLarge(ClientFault):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is larger than the sidecar accepts."


class TooManyStreams(ClientFault):
    """``guards.max_concurrent_streams_per_user``: the user has that many /v1 calls open."""

    status = 429
    code = "too_many_streams"
    type = "rate_limit_error"

    def __init__(self, limit: int, *, detail: str | None = None) -> None:
        calls = "call" if limit == 1 else "calls"
        super().__init__(
            f"This user already has {limit} AI {calls} in progress, the most this app allows at "
            "once. Wait for one to finish, then try again.",
            detail=detail,
            retry_after_s=1,
        )


class SpendLimitReached(ClientFault):
    """``guards.spend_limit_credits``: the user spent that much in the current window."""

    status = 429
    code = "spend_limit_reached"
    type = "rate_limit_error"

    def __init__(
        self, limit: int, period: str, retry_after_s: int, *, detail: str | None = None
    ) -> None:
        super().__init__(
            f"This user has used the {limit} credits this app allows {period}. The limit resets "
            f"in {_duration(retry_after_s)} (see Retry-After); calls are refused until then.",
            detail=detail,
            retry_after_s=retry_after_s,
        )


def _duration(seconds: int) -> str:
    """``3 h 5 min``, ``12 min``, ``40 s``: how long a person has to wait."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    return f"{secs} s"


class ServiceFault(SidecarError):
    status = 503
    code = "service_unavailable"
    type = "server_error"
    default_message = "The service is unavailable right now; try again shortly."


class StoreUnavailable(ServiceFault):
    status = 503
    code = "store_unavailable"
    default_message = (
        "The token store is unreachable right now; try again in a few seconds. Nothing was lost."
    )

    def __init__(self, message: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail, retry_after_s=2)


class RefreshUnavailable(ServiceFault):
    status = 503
    code = "refresh_unavailable"
    default_message = (
        "Quota could not renew this user's access right now; the wallet stays connected. "
        "Try again shortly."
    )

    def __init__(self, message: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail, retry_after_s=5)


class QuotaUnavailable(ServiceFault):
    status = 502
    code = "quota_unavailable"
    default_message = "Quota could not be reached or gave an unreadable answer; try again shortly."

    def timed_out(self) -> QuotaTimeout:
        """The same call, when Quota took the request but sent no answer in time."""
        return QuotaTimeout(detail=self.detail)


class QuotaTimeout(QuotaUnavailable):
    status = 504
    code = "quota_timeout"
    default_message = (
        "Quota took the request but did not start answering within quota.first_byte_timeout_s; "
        "the call was cancelled. Try again, or stream the answer (stream: true)."
    )


class TopupUnavailable(ServiceFault):
    status = 502
    code = "topup_unavailable"
    default_message = (
        "Quota could not start a top-up right now; try again shortly, or top up in Quota itself."
    )


class UpstreamUnavailable(ServiceFault):
    status = 502
    code = "upstream_unavailable"
    default_message = "The app behind the sidecar could not be reached."

    def timed_out(self) -> UpstreamTimeout:
        """The same request, when the app took it but sent no answer in time."""
        return UpstreamTimeout(detail=self.detail)


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
    code = "upstream_timeout"
    default_message = (
        "The app behind the sidecar took the request but did not start answering within "
        "upstream.first_byte_timeout_s; the request was cancelled."
    )


class CallbackError(Exception):
    """Ends the browser's OAuth round-trip at ``after_error?quota_error=<code>``."""

    def __init__(self, code: str, *, detail: str | None = None) -> None:
        self.code = code
        self.detail = detail
        super().__init__(code if detail is None else f"{code}: {detail}")
