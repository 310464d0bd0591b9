"""The admin listener, for the kubelet and Prometheus: ``/healthz``, ``/readyz``, ``/metrics``.

    /healthz   the process is alive and its event loop answers: always 200 while it runs,
               shutdown included (a liveness failure would only get the pod killed sooner)
    /readyz    200 when this replica should get traffic, else 503; the JSON body reports each
               check and lists the failed ones:
                 config           loaded and valid (the process would not run otherwise)
                 shutdown         503 from the moment SIGTERM arrives, so the pod leaves the
                                  Service before its listeners close
                 store            the token store answers ``ping`` within READY_CHECK_TIMEOUT_S
                 quota_discovery  Quota's discovery document answers 2xx; checked only with
                                  ``quota.check_discovery_on_ready`` (off by default)
    /metrics   Prometheus text (OpenMetrics when asked for), from this sidecar's own registry;
               under ``--workers`` every worker's, summed (``sidecar.worker_metrics``)

Nothing here reveals a user, a token or a URL with credentials: the store check reports the
error's class, not the URL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from sidecar import middleware
from sidecar.access_log import LISTENER
from sidecar.errors import SidecarError
from sidecar.services import SERVICES, Services

# Under the kubelet's probe timeout (the manifests use 3 s), so /readyz always answers itself.
READY_CHECK_TIMEOUT_S = 2.0
DISCOVERY_PATH = "/.well-known/openid-configuration"
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Health:
    """What the admin listener reports about the process as a whole."""

    draining: bool = False


HEALTH = web.AppKey("health", Health)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    checks: dict[str, dict[str, Any]] = {"config": {"ok": True}}
    checks["shutdown"] = (
        {"ok": False, "error": "shutting down"} if request.app[HEALTH].draining else {"ok": True}
    )
    if services.config.quota.check_discovery_on_ready:
        store, discovery = await asyncio.gather(_check_store(services), _check_discovery(services))
    else:
        store, discovery = await _check_store(services), {"ok": True, "skipped": True}
    checks["store"] = store
    checks["quota_discovery"] = discovery
    failed = [name for name, check in checks.items() if not check["ok"]]
    body = {"status": "ready" if not failed else "not_ready", "checks": checks, "failed": failed}
    return web.json_response(body, status=503 if failed else 200, headers=NO_STORE)


async def _check_store(services: Services) -> dict[str, Any]:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await services.tokens.store.ping()
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {READY_CHECK_TIMEOUT_S:g} s"}
    except SidecarError as exc:
        return {"ok": False, "error": exc.detail or exc.code}
    return {"ok": True, "backend": services.tokens.store.name}


async def _check_discovery(services: Services) -> dict[str, Any]:
    url = services.config.quota.base_url.rstrip("/") + DISCOVERY_PATH
    timeout = aiohttp.ClientTimeout(total=READY_CHECK_TIMEOUT_S)
    try:
        async with services.quota_http.get(url, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"ok": False, "error": type(exc).__name__}
    if not 200 <= status < 300:
        return {"ok": False, "error": f"answered {status}"}
    return {"ok": True}


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICES].metrics.exposition
    encode, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
    return web.Response(body=encode(registry), headers={"Content-Type": content_type, **NO_STORE})


def create_admin_app(services: Services, health: Health) -> web.Application:
    app = web.Application(middlewares=[middleware.for_listener("admin", services.metrics)])
    app[SERVICES] = services
    app[LISTENER] = "admin"
    app[HEALTH] = health
    app.on_response_prepare.append(middleware.add_request_id_header)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    app.router.add_get("/metrics", metrics)
    return app
