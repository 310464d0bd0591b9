"""The sidecar's configuration: typed, frozen sections and their documented defaults.

Loading (YAML, ``${VAR}`` interpolation, environment overrides, validation) lives in
``sidecar.config_loader``; this module only says what can be configured and why each default is
what it is. Units are in the names (``_s`` seconds, ``_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sidecar.secret import Secret

PRODUCTION_BASE_URL = "https://api.usequota.ai"
# The wallet recipe's scopes: spend for completions, read for the balance pill.
DEFAULT_SCOPES = ("credits.read", "credits.spend")
KNOWN_SCOPES = frozenset(
    {
        "openid",
        "profile",
        "email",
        "credits.read",
        "credits.spend",
        "account.read",
        "account.write",
        "apps.read",
        "apps.write",
    }
)
MIN_SESSION_SECRET_LENGTH = 32
MIN_EVENTS_SECRET_LENGTH = 32
# A webhook stamped this far in Quota's future is still accepted (clocks drift a little).
WEBHOOK_FUTURE_SKEW_S = 60
# A call sent with this much left reaches Quota long before its token ends; with less, callers
# wait for the new token.
DEFAULT_REFRESH_WAIT_SKEW_S = 5.0


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    client_id: str
    client_secret: Secret
    base_url: str = PRODUCTION_BASE_URL
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    # None: derived per request from Host (and X-Forwarded-* from trusted proxies).
    redirect_uri: str | None = None
    # Token, revoke and balance calls are small; ten seconds is generous.
    timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    # Time allowed between two reads of a started /v1 response: long model pauses must not cut a
    # stream.
    stream_idle_timeout_s: float = 300.0
    # From the request sent until Quota's answer starts. A call that is not streamed gets its
    # headers only when the whole completion is done, which can take minutes; 600 s is what the
    # OpenAI and Anthropic SDKs wait by default, so the sidecar never gives up before its caller.
    first_byte_timeout_s: float = 600.0
    # Request bodies up to this size are kept so a call Quota refused with 401 can be replayed
    # once after a forced refresh; larger bodies stream through and are not replayed.
    replay_max_bytes: int = 1024 * 1024
    # /readyz also asks Quota's discovery document. Off by default: every replica would turn
    # unready together while Quota blips, and a Service with no ready pod answers nothing at all.
    check_discovery_on_ready: bool = False


@dataclass(frozen=True, slots=True)
class ListenConfig:
    # Browser traffic; usually the pod's only exposed port.
    public: str = "0.0.0.0:8080"
    # The host app's backend only: loopback unless an internal API key is set.
    internal: str = "127.0.0.1:8081"
    # /healthz, /readyz, /metrics for the kubelet and Prometheus; "off" (or empty) turns it off.
    admin: str | None = "0.0.0.0:9090"

    @property
    def admin_address(self) -> str | None:
        """Where the admin listener binds, or ``None`` when it is turned off."""
        if self.admin is None or self.admin.strip().lower() in ("", "off"):
            return None
        return self.admin


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:3000"
    identity_probe_path: str = "/quota/whoami"
    # The probe is on the request path of every /auth/quota/* call: keep it short.
    probe_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    # No total timeout for proxied requests (downloads, long polls); only between reads.
    idle_timeout_s: float = 300.0
    # From the request sent until the app's answer starts; nginx's proxy_read_timeout default.
    first_byte_timeout_s: float = 60.0
    # pass: the browser's Host goes to the app (most apps build links from it);
    # rewrite: Host is the upstream's own (for apps that check it). X-Forwarded-Host has the original.
    host_header: Literal["pass", "rewrite"] = "pass"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # One header line, and how many headers, per request (every listener).
    max_header_size_bytes: int = 16384
    max_header_count: int = 100
    # Public listener request bodies, counted as they stream (0: no limit; uploads are the app's).
    max_body_bytes: int = 0
    # /v1 request bodies (chat, audio uploads); counted as they stream.
    max_v1_body_bytes: int = 32 * 1024 * 1024
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 75.0
    # A request head (request line and headers) must be complete this long after the connection
    # opened, or after its first byte on a kept-alive one; real clients send it in one go.
    header_timeout_s: float = 10.0
    # Longest silence between two reads of a request body from the client (nginx's
    # client_body_timeout default): a slow sender cannot hold a connection to the app or Quota.
    body_idle_timeout_s: float = 60.0
    # Outgoing connections kept per target (Quota, the app); 0 means no cap.
    # (every open stream holds one; a full pool answers 502 after connect_timeout_s).
    pool_size: int = 4096
    # Connections the kernel queues per listener before the sidecar accepts them: nginx's
    # default, so a burst of new clients is not cut at aiohttp's 128 (the kernel caps it at
    # net.core.somaxconn).
    backlog: int = 511


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    # Quota's own hosted mode names the user with this header, so apps already know it.
    header: str = "X-Quota-User"
    internal_api_key: Secret | None = None
    max_length: int = 256


@dataclass(frozen=True, slots=True)
class SessionConfig:
    secret: Secret
    cookie_name: str = "quota_sidecar"
    # auto: Secure only when the request came over https, so http://localhost dev keeps working.
    secure: Literal["auto", "always", "never"] = "auto"
    # Peers whose X-Forwarded-Proto/Host/For are believed (IPs or CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    # How long a started connect may take to come back (the recipe's 10 minutes).
    pending_ttl_s: int = 600


@dataclass(frozen=True, slots=True)
class TokensConfig:
    # "memory" (one process) or a redis://, rediss://, unix:// URL (REDIS_URL).
    store: str = "memory"
    # base64url 32-byte keys; first seals, all open. Empty: derived from session.secret.
    encryption_keys: tuple[Secret, ...] = ()
    # Refresh this long before expiry so a token never expires in flight.
    refresh_skew_s: float = 30.0
    # Callers wait for that refresh only with less than this left; until then it runs in the
    # background and they use the current token. Unset: this or refresh_skew_s if smaller.
    refresh_wait_skew_s: float = DEFAULT_REFRESH_WAIT_SKEW_S
    # Cross-replica refresh lock lease; renewed while the token call runs.
    lock_ttl_s: float = 10.0
    key_prefix: str = "quota-sidecar"
    # An opened record is kept in the process this long between calls (never into the wait
    # skew), dropped at once when any replica changes it; 0 reads the store on every call.
    cache_ttl_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RedirectsConfig:
    after_connect: str = "/"
    after_error: str = "/"
    # Where to send a browser that hits /auth/quota/connect signed out (None: 401 JSON).
    login_url: str | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    # After SIGTERM /readyz fails at once, but the listeners keep accepting this long, so load
    # balancers and kube-proxy stop sending before the ports close.
    drain_delay_s: float = 2.0
    # Then requests and streams in flight get this long to finish before they are cut. Keep
    # drain_delay_s + grace_s under the pod's terminationGracePeriodSeconds (30 s by default).
    grace_s: float = 25.0


@dataclass(frozen=True, slots=True)
class EventsConfig:
    # None: no events are sent. Else an absolute http(s) URL on the host app that receives them.
    url: str | None = None
    # Signs every delivery (HMAC-SHA256) so the app can tell them from forgeries; required with url.
    secret: Secret | None = None
    # One delivery attempt; the app should answer at once and do its work afterwards.
    timeout_s: float = 5.0
    # Attempts per event before it is given up (and counted as failed).
    max_attempts: int = 5
    # Wait before the first retry, doubled after each one, never more than backoff_max_s.
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    # Events waiting to be sent; past this, new events are dropped and counted, never waited for.
    queue_size: int = 1000
    # At shutdown, queued events get this long to go out; it adds to the pod's shutdown time.
    flush_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class TopupConfig:
    # Where Quota's checkout sends the browser back (paths on the app's own public origin).
    success_path: str = "/?quota_topup=success"
    cancel_path: str = "/?quota_topup=cancelled"
    # The app's public origin, for the X-Quota-Topup-Url header on /v1 answers (no browser there
    # to take it from); used when quota.redirect_uri is unset, else the header is left out.
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class GuardsConfig:
    # Open /v1 calls (a streaming answer, a WebSocket) one user may hold at once; 0: no limit.
    max_concurrent_streams_per_user: int = 0
    # Credits one user may spend per window, counted from Quota's quota blocks; 0: no limit.
    spend_limit_credits: int = 0
    # The spend window, fixed and aligned to the Unix epoch: a day resets at 00:00 UTC.
    spend_period_s: int = 86400
    # With Redis, an open call's lease lapses this long after its replica stopped renewing it
    # (a crash); renewed every third of it, so one slow renewal does not free the slot.
    stream_lease_ttl_s: float = 30.0


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    # Quota's whsec_ signing secret for POST /auth/quota/webhook; None: webhooks are not received.
    secret: Secret | None = None
    # Quota delivers within seconds and retries for a short while; older events are refused.
    max_age_s: int = 300
    # How long an event id is remembered to refuse a replay; must cover max_age_s and then some.
    replay_window_s: int = 86400


@dataclass(frozen=True, slots=True)
class Config:
    quota: QuotaConfig
    session: SessionConfig
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    redirects: RedirectsConfig = field(default_factory=RedirectsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    topup: TopupConfig = field(default_factory=TopupConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)


SECTIONS: dict[str, type] = {
    "quota": QuotaConfig,
    "listen": ListenConfig,
    "upstream": UpstreamConfig,
    "identity": IdentityConfig,
    "session": SessionConfig,
    "tokens": TokensConfig,
    "redirects": RedirectsConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "shutdown": ShutdownConfig,
    "events": EventsConfig,
    "topup": TopupConfig,
    "guards": GuardsConfig,
    "webhooks": WebhooksConfig,
}

# Well-known variables, as in Quota's recipe. Any key can also be set as
# QUOTA_SIDECAR__<SECTION>__<KEY>, e.g. QUOTA_SIDECAR__TOKENS__REFRESH_SKEW_S=60.
ENV_ALIASES: dict[str, tuple[str, str]] = {
    "QUOTA_CLIENT_ID": ("quota", "client_id"),
    "QUOTA_CLIENT_SECRET": ("quota", "client_secret"),
    "QUOTA_BASE_URL": ("quota", "base_url"),
    "QUOTA_REDIRECT_URI": ("quota", "redirect_uri"),
    "SESSION_SECRET": ("session", "secret"),
    "REDIS_URL": ("tokens", "store"),
    "QUOTA_INTERNAL_API_KEY": ("identity", "internal_api_key"),
    "QUOTA_SIDECAR_EVENTS_SECRET": ("events", "secret"),
    "QUOTA_WEBHOOK_SECRET": ("webhooks", "secret"),
}
