"""The sidecar's error tree: every failure a client can see, with its status and stable code.

    SidecarError                      (500 internal_error)
    ├── ClientFault                   4xx: the caller can fix it
    │   ├── BadRequest                400 invalid_request
    │   │   ├── IdentityMissing       400 identity_missing
    │   │   ├── IdentityInvalid       400 identity_invalid
    │   │   └── InvalidPath           400 invalid_path
    │   ├── NotSignedIn               401 not_signed_in
    │   ├── WalletNotConnected        401 wallet_not_connected
    │   ├── InvalidApiKey             401 invalid_api_key
    │   ├── ForbiddenOrigin           403 forbidden_origin
    │   ├── NotFound                  404 not_found
    │   ├── MethodNotAllowed          405 method_not_allowed
    │   └── PayloadTooLarge           413 payload_too_large
    └── ServiceFault                  5xx: ours or a dependency's
        ├── StoreUnavailable          503 store_unavailable
        ├── RefreshUnavailable        503 refresh_unavailable
        ├── QuotaUnavailable          502 quota_unavailable
        └── UpstreamUnavailable       502 upstream_unavailable

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


class MethodNotAllowed(ClientFault):
    status = 405
    code = "method_not_allowed"
    default_message = "This path does not accept that HTTP method."


class PayloadTooLarge(ClientFault):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is larger than the sidecar accepts."


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


class UpstreamUnavailable(ServiceFault):
    status = 502
    code = "upstream_unavailable"
    default_message = "The app behind the sidecar could not be reached."


class CallbackError(Exception):
    """Ends the browser's OAuth round-trip at ``after_error?quota_error=<code>``."""

    def __init__(self, code: str, *, detail: str | None = None) -> None:
        self.code = code
        self.detail = detail
        super().__init__(code if detail is None else f"{code}: {detail}")
