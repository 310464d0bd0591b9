"""The checks that read the configuration only: config, secrets, redirect URI, internal listener.

The loader already refuses what is invalid; these checks look for what is valid but wrong for
the place it runs (a callback Quota will refuse in production, a listener any peer can reach),
and explain each answer, so an operator learns why as well as what.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from sidecar.config import MIN_SESSION_SECRET_LENGTH, Config
from sidecar.config_loader import ConfigError, decode_key, is_loopback_host, split_host_port
from sidecar.doctor.result import CheckResult, failed, passed, warned

CALLBACK_PATH = "/auth/quota/callback"
MIN_INTERNAL_KEY_LENGTH = 24  # as the loader requires
# A generated secret of 32+ characters has ~30 distinct ones; "x" * 32 or "changeme…" have few.
MIN_DISTINCT_CHARACTERS = 10
HOW_TO_GENERATE = "`quota-sidecar gen-secret`"
_SECRET_KEYS = ("session.secret", "quota.client_secret", "identity.internal_api_key", "tokens.")


def config_loaded(source: str) -> CheckResult:
    return passed("config", f"{source} loads; every key is known and valid")


def config_invalid(error: ConfigError, source: str) -> list[CheckResult]:
    """The config check's failure, and the secrets check's, read from the loader's problems."""
    results = [
        failed(
            "config",
            f"{source}: {len(error.problems)} problem(s)\n" + "\n".join(error.problems),
            "fix each key named above, then run `quota-sidecar doctor` again "
            "(`quota-sidecar check-config` prints the effective configuration)",
        )
    ]
    about_secrets = [p for p in error.problems if p.startswith(_SECRET_KEYS)]
    if about_secrets:
        results.append(
            failed(
                "secrets",
                "\n".join(about_secrets),
                f"generate each secret with {HOW_TO_GENERATE} (SESSION_SECRET must be the same on "
                "every replica)",
            )
        )
    return results


def check_secrets(config: Config) -> CheckResult:
    problems: list[str] = []
    fixes: list[str] = []
    notes: list[str] = []
    secret = config.session.secret
    if len(secret) < MIN_SESSION_SECRET_LENGTH:
        problems.append(
            f"session.secret has {len(secret)} characters; at least {MIN_SESSION_SECRET_LENGTH} "
            "are needed (it keys the cookie and, by default, the token encryption)"
        )
        fixes.append(
            f"set SESSION_SECRET to the output of {HOW_TO_GENERATE}, the same on every replica"
        )
    if not config.quota.client_secret:
        problems.append("quota.client_secret is empty")
        fixes.append("set QUOTA_CLIENT_SECRET to the secret Quota gave when the app was registered")
    key = config.identity.internal_api_key
    if key is not None and len(key) < MIN_INTERNAL_KEY_LENGTH:
        problems.append(
            f"identity.internal_api_key has {len(key)} characters; at least "
            f"{MIN_INTERNAL_KEY_LENGTH} are needed"
        )
        fixes.append(f"set QUOTA_INTERNAL_API_KEY to the output of {HOW_TO_GENERATE}")
    bad_keys = [i for i, k in enumerate(config.tokens.encryption_keys) if decode_key(k) is None]
    for i in bad_keys:
        problems.append(f"tokens.encryption_keys[{i}] is not 32 bytes in base64url")
    if bad_keys:
        fixes.append(f"make each encryption key with {HOW_TO_GENERATE}")
    if problems:
        return failed("secrets", "\n".join(problems), "; ".join(fixes))

    distinct = len(set(secret.reveal()))
    notes.append(f"session.secret has {len(secret)} characters")
    keys = config.tokens.encryption_keys
    notes.append(
        f"{len(keys)} token encryption key(s) configured"
        if keys
        else "token encryption key derived from session.secret"
    )
    if key is not None:
        notes.append(f"internal API key has {len(key)} characters")
    if distinct < MIN_DISTINCT_CHARACTERS:
        return warned(
            "secrets",
            "; ".join(notes) + f", but only {distinct} distinct ones: it looks like a placeholder",
            f"set SESSION_SECRET to the output of {HOW_TO_GENERATE}",
        )
    return passed("secrets", "; ".join(notes))


def check_redirect_uri(config: Config, *, production: bool) -> CheckResult:
    """The ``redirect_uri`` Quota will see, judged by Quota's rule: https, or http on loopback."""
    uri = config.quota.redirect_uri
    if uri is None:
        return _derived_redirect_uri(config, production=production)
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.scheme == "http" and not is_loopback_host(host):
        https = urlunsplit(("https", parts.netloc, parts.path, "", ""))
        return failed(
            "redirect-uri",
            f"quota.redirect_uri is {uri}: plain http on a host other than localhost or "
            "127.0.0.1, which Quota refuses (invalid_redirect_uri)",
            f"set quota.redirect_uri (QUOTA_REDIRECT_URI) to {https}, register that on the "
            "Quota app, and serve the site over https",
        )
    if parts.path != CALLBACK_PATH:
        return warned(
            "redirect-uri",
            f"quota.redirect_uri is {uri}; the sidecar answers the callback at {CALLBACK_PATH}",
            f"make sure the proxy in front maps {parts.path} to the sidecar's {CALLBACK_PATH}",
        )
    if parts.scheme == "http" and production:
        return warned(
            "redirect-uri",
            f"quota.redirect_uri is {uri}: a loopback callback in production mode, so only a "
            "browser on this very machine can finish a connect",
            "set quota.redirect_uri to https://<your public host>/auth/quota/callback",
        )
    return passed("redirect-uri", f"{uri} (configured; register exactly this on the Quota app)")


def _derived_redirect_uri(config: Config, *, production: bool) -> CheckResult:
    host, port = split_host_port(config.listen.public)
    proxies = config.session.trusted_proxies
    if proxies:
        return passed(
            "redirect-uri",
            "derived per request from X-Forwarded-Proto and X-Forwarded-Host, believed from "
            f"{', '.join(proxies)}: behind your TLS proxy it is "
            f"https://<your host>{CALLBACK_PATH}; register exactly that on the Quota app",
        )
    if production and not is_loopback_host(host):
        return failed(
            "redirect-uri",
            "derived per request from the Host header, and session.trusted_proxies is empty: "
            "behind a TLS proxy the sidecar sees plain http and sends "
            f"http://<your host>{CALLBACK_PATH}, which Quota refuses in production",
            f"set quota.redirect_uri (QUOTA_REDIRECT_URI) to https://<your host>{CALLBACK_PATH}, "
            "or list your proxy's addresses in session.trusted_proxies",
        )
    shown = "localhost" if host in ("", "0.0.0.0", "::") else host  # noqa: S104 - compared only
    example = f"http://{shown}:{port}"
    return passed(
        "redirect-uri",
        "derived per request from the Host header (X-Forwarded-* only from "
        f"session.trusted_proxies): a browser on {example} gets {example}{CALLBACK_PATH}",
    )


def check_internal_listener(config: Config) -> CheckResult:
    address = config.listen.internal
    host, _ = split_host_port(address)
    key = config.identity.internal_api_key
    if is_loopback_host(host):
        extra = "; calls must carry the internal API key as well" if key is not None else ""
        return passed(
            "internal-listener",
            f"{address} is loopback: only processes on this host (in Kubernetes, the containers "
            f"of this pod) can reach it{extra}",
        )
    reach = "every interface" if host in ("", "0.0.0.0", "::") else host  # noqa: S104
    if key is not None:
        return passed(
            "internal-listener",
            f"{address} listens on {reach}, off loopback, but every call must carry the "
            "internal API key (Authorization: Bearer or x-api-key), so no other peer can "
            "name a user",
        )
    return failed(
        "internal-listener",
        f"{address} listens on {reach}, off loopback, with no internal API key: any peer "
        "that reaches it can name any user and spend that user's wallet",
        "bind listen.internal to 127.0.0.1:8081, or set identity.internal_api_key "
        f"(QUOTA_INTERNAL_API_KEY, made with {HOW_TO_GENERATE}) and send it from your backend",
    )
