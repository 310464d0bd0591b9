"""nginx configurations for the bench: the reference reverse proxy, and the stub's fast front.

Both run as ordinary child processes (``daemon off``), from a config written into a temporary
prefix, listening on loopback only:

* ``proxy_conf``: the practical speed of light for one hop. It forwards everything to the stub
  with a fixed ``Authorization: Bearer`` (what the sidecar does, less the per-user lookup), over
  kept-alive upstream connections, without buffering (so SSE passes as it comes).
* ``front_conf``: answers the plain chat call itself (``return 200`` with the stub's JSON, far
  cheaper than any Python server) and passes the rest (SSE, OAuth, the identity probe) to the
  aiohttp stub. Requests pick the streamed answer with the ``X-Bench-Stream`` header, since
  nginx cannot read a JSON body to find ``"stream": true``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FIXED_BEARER = "quota_token_nginx_reference"
# Idle upstream connections each worker keeps; the load never has more in flight than this.
UPSTREAM_KEEPALIVE = 256
# Far beyond any run, so no connection is closed for having served "enough" requests.
KEEPALIVE_REQUESTS = 100_000_000


def binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if Path(candidate).is_file():
            return candidate
    return None


def version(path: str) -> str:
    done = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
        [path, "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def _main_block(prefix: Path, workers: int | str) -> str:
    return f"""
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
    multi_accept on;
}}
"""


def _http_common(prefix: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 300s;
    server_tokens off;
"""


def _pass_to(upstream: str) -> str:
    return f"""
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
"""


def proxy_conf(prefix: Path, *, listen_port: int, upstream_port: int, workers: int | str) -> str:
    """The reference proxy: every request to the stub, with a fixed bearer token."""
    return f"""{_main_block(prefix, workers)}
http {{
{_http_common(prefix)}
    upstream quota {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            {_pass_to("quota")}
            proxy_set_header Authorization "Bearer {FIXED_BEARER}";
        }}
    }}
}}
"""


def front_conf(
    prefix: Path, *, listen_port: int, stub_port: int, chat_json: bytes, workers: int | str
) -> str:
    """The stub's front: the plain chat answer from nginx itself, the rest from the stub."""
    body = chat_json.decode()
    if "'" in body or "$" in body:
        raise ValueError("the chat answer must not hold ' or $ (nginx string syntax)")
    return f"""{_main_block(prefix, workers)}
http {{
{_http_common(prefix)}
    upstream stub {{
        server 127.0.0.1:{stub_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location = /v1/chat/completions {{
            error_page 418 = @stub;
            if ($http_x_bench_stream) {{
                return 418;
            }}
            default_type application/json;
            return 200 '{body}';
        }}
        location / {{
            {_pass_to("stub")}
        }}
        location @stub {{
            {_pass_to("stub")}
        }}
    }}
}}
"""


def write_conf(prefix: Path, text: str) -> Path:
    """Write ``text`` as ``prefix/nginx.conf``, with the temp folders nginx expects."""
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # workers may run as an unprivileged user when nginx starts as root
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / name).mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    return conf


def command(path: str, prefix: Path, conf: Path) -> list[str]:
    # -e: nginx would otherwise open its compiled-in error log before reading the config.
    return [path, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
