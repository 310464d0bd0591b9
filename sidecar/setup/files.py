"""What ``init`` writes, and how: every file whole, or not at all.

Three files, relative to the output directory:

    config/sidecar.yaml             (0644) settings; secrets only as ${QUOTA_CLIENT_ID}-style refs
    .env                            (0600) QUOTA_CLIENT_ID, QUOTA_CLIENT_SECRET, SESSION_SECRET
                                           (+ QUOTA_BASE_URL when Quota is not production)
    k8s/quota-sidecar-secret.yaml   (0600) a Kubernetes Secret, ``stringData`` with the three

``write_all`` stages each file as a temporary file beside its target, already at its final mode
(so a secret is never readable by others, not even for a moment), writes and fsyncs it, lets the
caller validate the staged config, and only then renames each into place with ``os.replace``,
which is atomic within a directory: a reader sees the old file or the new one, never half of
one. Without ``force`` an existing target stops everything before any file is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sidecar.config import PRODUCTION_BASE_URL
from sidecar.secret import Secret
from sidecar.setup.developer import RegisteredApp

CONFIG_PATH = Path("config/sidecar.yaml")
ENV_PATH = Path(".env")
SECRET_MANIFEST_PATH = Path("k8s/quota-sidecar-secret.yaml")
TARGETS = (CONFIG_PATH, ENV_PATH, SECRET_MANIFEST_PATH)

CONFIG_MODE = 0o644
SECRET_MODE = 0o600  # the owner only: these files hold the client secret
CALLBACK_PATH = "/auth/quota/callback"
# The recipe's development callback: the sidecar derives it for a browser on localhost:5180.
DEV_REDIRECT_URI = "http://localhost:5180/auth/quota/callback"
DEV_LISTEN_PUBLIC = "localhost:5180"
PRODUCTION_LISTEN_PUBLIC = "0.0.0.0:8080"  # the pod's port, behind its ingress
DEFAULT_SECRET_NAME = "quota-sidecar"  # noqa: S105 - a name, not a secret
_ENV_SAFE = re.compile(r"[A-Za-z0-9_\-.:/@+=~%,]*")


class TargetsExist(Exception):
    """Some files ``init`` would write are already there; nothing was changed."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        super().__init__(", ".join(str(p) for p in self.paths))


@dataclass(frozen=True, slots=True)
class Setup:
    """Everything the three files say."""

    app: RegisteredApp
    session_secret: Secret
    quota_base_url: str
    redirect_uri: str | None  # the production callback; None: development only
    upstream_url: str
    secret_name: str = DEFAULT_SECRET_NAME

    @property
    def production_quota(self) -> bool:
        return self.quota_base_url.rstrip("/") == PRODUCTION_BASE_URL


@dataclass(frozen=True, slots=True)
class OutputFile:
    relative: Path
    mode: int
    text: str


def existing_targets(directory: Path) -> list[Path]:
    """The targets already present (as paths relative to ``directory``)."""
    return [rel for rel in TARGETS if (directory / rel).exists() or (directory / rel).is_symlink()]


def render(setup: Setup) -> list[OutputFile]:
    return [
        OutputFile(CONFIG_PATH, CONFIG_MODE, render_config(setup)),
        OutputFile(ENV_PATH, SECRET_MODE, render_env(setup)),
        OutputFile(SECRET_MANIFEST_PATH, SECRET_MODE, render_secret_manifest(setup)),
    ]


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when that reads back the same, quoted otherwise."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    )


def _comment(text: str) -> str:
    """A value safe inside a ``#`` comment: one line."""
    return " ".join(text.split())


def render_config(setup: Setup) -> str:
    app = setup.app
    lines = [
        f'# quota-sidecar configuration for the Quota app "{_comment(app.name)}" ({app.client_id}),',
        "# written by `quota-sidecar init`. No secret is in this file: ${QUOTA_CLIENT_ID},",
        "# ${QUOTA_CLIENT_SECRET} and ${SESSION_SECRET} come from the environment (.env on a",
        "# workstation: `set -a; . ./.env; set +a`; the Secret in k8s/ in a cluster).",
        "# Check the whole set-up with `quota-sidecar doctor --config config/sidecar.yaml`.",
        "",
        "quota:",
    ]
    if not setup.production_quota:
        lines.append(f"  base_url: {_scalar(setup.quota_base_url.rstrip('/'))}")
    lines += [
        "  client_id: ${QUOTA_CLIENT_ID}",
        "  client_secret: ${QUOTA_CLIENT_SECRET}",
    ]
    if setup.redirect_uri is not None:
        lines += [
            "  # The callback the sidecar sends to Quota, registered on the app byte for byte. To run",
            "  # this file on a workstation instead, set QUOTA_REDIRECT_URI to the development one",
            f"  # ({DEV_REDIRECT_URI}) and QUOTA_SIDECAR__LISTEN__PUBLIC={DEV_LISTEN_PUBLIC}.",
            f"  redirect_uri: {_scalar(setup.redirect_uri)}",
            "",
            "listen:",
            "  # Browser traffic, from your ingress or TLS proxy.",
            f"  public: {_scalar(PRODUCTION_LISTEN_PUBLIC)}",
        ]
    else:
        lines += [
            "",
            "listen:",
            f"  # Browse http://{DEV_LISTEN_PUBLIC}: the callback derived from that address,",
            f"  # {DEV_REDIRECT_URI}, is the one registered for development.",
            f"  public: {_scalar(DEV_LISTEN_PUBLIC)}",
        ]
    lines += [
        "  # Your app's backend calls /v1/* here, naming the user in X-Quota-User.",
        "  internal: 127.0.0.1:8081",
        "",
        "upstream:",
        "  # Your app. It answers GET /quota/whoami with the signed-in user's id in X-Quota-User.",
        f"  url: {_scalar(setup.upstream_url.rstrip('/'))}",
        "  identity_probe_path: /quota/whoami",
        "",
        "session:",
        "  secret: ${SESSION_SECRET}",
        "",
        "tokens:",
        "  # memory: one process, lost on restart. Set REDIS_URL to share tokens between replicas.",
        "  store: ${REDIS_URL:-memory}",
        "",
    ]
    return "\n".join(lines)


def env_values(setup: Setup) -> dict[str, str]:
    """The variables ``.env`` sets, in order."""
    values = {
        "QUOTA_CLIENT_ID": setup.app.client_id,
        "QUOTA_CLIENT_SECRET": setup.app.client_secret.reveal(),
        "SESSION_SECRET": setup.session_secret.reveal(),
    }
    if not setup.production_quota:
        values["QUOTA_BASE_URL"] = setup.quota_base_url.rstrip("/")
    return values


def _env_value(value: str) -> str:
    """Bare when safe for both a shell and dotenv readers; single-quoted otherwise."""
    if _ENV_SAFE.fullmatch(value):
        return value
    return "'" + value.replace("'", "'\\''") + "'"


def render_env(setup: Setup) -> str:
    lines = [
        f'# quota-sidecar secrets for the Quota app "{_comment(setup.app.name)}".',
        "# Written by `quota-sidecar init`. Quota showed the client secret once: it is here and in",
        "# the Kubernetes Secret only. Keep this file out of version control.",
        "# Load it into a shell with: set -a; . ./.env; set +a",
    ]
    lines += [f"{name}={_env_value(value)}" for name, value in env_values(setup).items()]
    return "\n".join(lines) + "\n"


def render_secret_manifest(setup: Setup) -> str:
    data = {
        "QUOTA_CLIENT_ID": setup.app.client_id,
        "QUOTA_CLIENT_SECRET": setup.app.client_secret.reveal(),
        "SESSION_SECRET": setup.session_secret.reveal(),
    }
    lines = [
        f'# quota-sidecar secrets for the Quota app "{_comment(setup.app.name)}".',
        "# Written by `quota-sidecar init`. Apply: kubectl apply -f k8s/quota-sidecar-secret.yaml",
        f"# and give the sidecar container envFrom: [{{secretRef: {{name: {setup.secret_name}}}}}].",
        "# It holds the client secret: keep it out of version control.",
        "apiVersion: v1",
        "kind: Secret",
        "metadata:",
        f"  name: {_scalar(setup.secret_name)}",
        "  labels:",
        "    app.kubernetes.io/name: quota-sidecar",
        "type: Opaque",
        "stringData:",
    ]
    lines += [f"  {name}: {_scalar(value)}" for name, value in data.items()]
    return "\n".join(lines) + "\n"


def write_all(
    directory: Path,
    files: Sequence[OutputFile],
    *,
    force: bool,
    validate: Callable[[dict[Path, Path]], None] | None = None,
) -> None:
    """Write ``files`` under ``directory``: all of them, each whole, or none.

    ``validate`` gets the staged temporary file of each target (keyed by relative path) before
    anything is renamed into place; raising there leaves every target as it was.
    """
    if not force:
        present = existing_targets(directory)
        if present:
            raise TargetsExist(present)
    staged: dict[Path, Path] = {}
    try:
        for item in files:
            target = directory / item.relative
            target.parent.mkdir(parents=True, exist_ok=True)
            staged[item.relative] = _stage(target, item.text, item.mode)
        if validate is not None:
            validate(staged)
        if not force:  # checked again: the files may have appeared while we were busy
            present = existing_targets(directory)
            if present:
                raise TargetsExist(present)
        for relative, temp in list(staged.items()):
            os.replace(temp, directory / relative)
            del staged[relative]
            _fsync_directory((directory / relative).parent)
    finally:
        for temp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def _stage(target: Path, text: str, mode: int) -> Path:
    """A temporary file beside ``target`` with ``text``, at ``mode``, flushed to disk."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            # mkstemp made it 0600; the final mode is set before any content is written.
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return temp


def _fsync_directory(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds it (where the OS allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
