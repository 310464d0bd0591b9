"""The Kubernetes manifests: valid against the API schemas offline, and safe as deployed.

Every YAML file under ``k8s/`` (patches aside) and every kustomization's rendered output is
checked with ``kubernetes-validate`` in strict mode (unknown fields are errors), against the
oldest Kubernetes each targets and the newest the package knows. The rendered objects are then
read as an operator would: who runs as what, which port each probe and the Service use, and
what the NetworkPolicy lets in.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import sidecar
from sidecar.admin import READY_CHECK_TIMEOUT_S
from sidecar.config import Config
from sidecar.config_loader import is_loopback_host, load_config, split_host_port
from tests.deploy.kustomize import Doc, build, containers_of, load_documents

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
NEWEST = "1.37"
# Native sidecars and the preStop sleep action are on by default from 1.30; the legacy overlay
# is for older clusters.
KUSTOMIZATIONS = {
    "base": ("1.30", NEWEST),
    "overlays/dev": ("1.30", NEWEST),
    "overlays/legacy-sidecar": ("1.27", NEWEST),
}
SIDECAR = "quota-sidecar"
DUMMY_ENV = {
    "QUOTA_CLIENT_ID": "quota_client_manifest",
    "QUOTA_CLIENT_SECRET": "quota_secret_manifest",
    "SESSION_SECRET": "manifest-session-secret-of-32-chars-or-more",
    "REDIS_URL": "redis://quota-sidecar-redis:6379/0",
}


def patch_files() -> set[Path]:
    """Files named under ``patches:``: fragments, not whole objects."""
    found = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        found |= {(kustomization.parent / p["path"]).resolve() for p in doc.get("patches", [])}
    return found


def manifest_files() -> list[Path]:
    skip = patch_files()
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in skip
    )


def rendered(name: str) -> list[Doc]:
    return build(K8S / name)


def one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def sidecar_container(deployment: Doc) -> Doc:
    (found,) = [c for c in containers_of(deployment) if c["name"] == SIDECAR]
    return found


def sidecar_config(docs: list[Doc], tmp_path: Path) -> Config:
    path = tmp_path / "sidecar.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["sidecar.yaml"], encoding="utf-8")
    return load_config(path, DUMMY_ENV)


def port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def validate(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {where}: {exc.message}")


# -- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates_against_the_kubernetes_schemas(path: Path) -> None:
    oldest = "1.27" if "legacy-sidecar" in path.parts else "1.30"
    docs = load_documents(path)
    assert docs, "an empty manifest"
    for doc in docs:
        for version in (oldest, NEWEST):
            validate(doc, version)


@pytest.mark.parametrize(
    ("name", "version"),
    [(name, version) for name, versions in KUSTOMIZATIONS.items() for version in versions],
)
def test_every_kustomization_renders_objects_that_validate(name: str, version: str) -> None:
    docs = rendered(name)
    assert docs
    for doc in docs:
        validate(doc, version)


def test_the_oldest_supported_schema_is_what_the_base_needs() -> None:
    """The base uses 1.29+ fields: the legacy overlay is what older clusters need."""
    deployment = one(rendered("base"), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.27", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on this machine")
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_offline_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    def key(doc: Doc) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    assert sorted(rendered(name), key=key) == theirs


# -- what runs, and as whom --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_sidecar_runs_as_a_non_root_user_on_a_read_only_root_filesystem(name: str) -> None:
    deployment = one(rendered(name), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = sidecar_container(deployment)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # The one writable place: /tmp, an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] != "/tmp")
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]


def test_the_base_runs_the_sidecar_as_a_native_sidecar() -> None:
    spec = one(rendered("base"), "Deployment")["spec"]["template"]["spec"]
    (native,) = spec["initContainers"]
    assert native["name"] == SIDECAR
    assert native["restartPolicy"] == "Always"
    assert SIDECAR not in [c["name"] for c in spec["containers"]]


def test_the_legacy_overlay_runs_the_sidecar_as_a_plain_container_that_drains_longer() -> None:
    spec = one(rendered("overlays/legacy-sidecar"), "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    container = next(c for c in spec["containers"] if c["name"] == SIDECAR)
    assert "restartPolicy" not in container
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert float(env["QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S"]) > 2


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_probes_use_the_admin_port_and_the_right_paths(name: str, tmp_path: Path) -> None:
    docs = rendered(name)
    container = sidecar_container(one(docs, "Deployment"))
    admin_port = split_host_port(sidecar_config(docs, tmp_path).listen.admin or "")[1]
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert port_number(container, http["port"]) == admin_port, probe
    # The sidecar answers /readyz within its own check timeout, under the kubelet's.
    assert container["readinessProbe"]["timeoutSeconds"] > READY_CHECK_TIMEOUT_S


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_service_reaches_the_public_listener_and_never_the_internal_one(
    name: str, tmp_path: Path
) -> None:
    docs = rendered(name)
    config = sidecar_config(docs, tmp_path)
    container = sidecar_container(one(docs, "Deployment"))
    public = split_host_port(config.listen.public)[1]
    internal_host, internal = split_host_port(config.listen.internal)
    assert is_loopback_host(internal_host)
    services = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "web"]
    (service,) = services
    targets = {port_number(container, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {public}
    assert internal not in {p["containerPort"] for p in container["ports"]}
    assert service["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_network_policy_admits_the_public_port_and_admin_from_monitoring_only(
    name: str, tmp_path: Path
) -> None:
    docs = rendered(name)
    config = sidecar_config(docs, tmp_path)
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == (deployment["spec"]["template"]["metadata"]["labels"])
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted: dict[int, Any] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            admitted[port["port"]] = rule.get("from")
    public = split_host_port(config.listen.public)[1]
    admin = split_host_port(config.listen.admin or "")[1]
    assert set(admitted) == {public, admin}
    assert admitted[admin] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_a_disruption_budget_covers_the_pods(name: str) -> None:
    docs = rendered(name)
    budget = one(docs, "PodDisruptionBudget")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_termination_grace_period_covers_the_drain_and_the_grace(
    name: str, tmp_path: Path
) -> None:
    docs = rendered(name)
    config = sidecar_config(docs, tmp_path)
    deployment = one(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in sidecar_container(deployment)["env"]}
    drain = float(env.get("QUOTA_SIDECAR__SHUTDOWN__DRAIN_DELAY_S", config.shutdown.drain_delay_s))
    period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    app_prestop_s = 5
    assert period >= app_prestop_s + drain + config.shutdown.grace_s + 5


def test_the_sidecar_config_in_the_config_map_loads_and_matches_the_container(
    tmp_path: Path,
) -> None:
    docs = rendered("base")
    config = sidecar_config(docs, tmp_path)
    container = sidecar_container(one(docs, "Deployment"))
    declared = {p["containerPort"] for p in container["ports"]}
    assert split_host_port(config.listen.public)[1] in declared
    assert split_host_port(config.listen.admin or "")[1] in declared
    env = {e["name"]: e for e in container["env"]}
    assert env["QUOTA_SIDECAR_CONFIG"]["value"].startswith("/etc/quota-sidecar/")
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "quota-sidecar-redis"


def test_the_base_image_tag_is_the_package_version() -> None:
    container = sidecar_container(one(rendered("base"), "Deployment"))
    assert container["image"] == f"quota-sidecar:{sidecar.__version__}"


def test_the_secret_template_holds_placeholders_for_exactly_what_the_sidecar_reads() -> None:
    docs = load_documents(K8S / "base" / "secret.example.yaml")
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs}
    assert set(secrets["quota-sidecar"]) == {
        "QUOTA_CLIENT_ID",
        "QUOTA_CLIENT_SECRET",
        "SESSION_SECRET",
    }
    assert set(secrets["quota-sidecar-redis"]) == {"REDIS_URL"}
    for values in secrets.values():
        assert all(value.startswith("REPLACE_WITH_") for value in values.values())
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "secret.example.yaml" not in listed["resources"], "applying it would erase real secrets"


def test_the_dev_overlay_adds_a_redis_and_points_redis_url_at_it() -> None:
    docs = rendered("overlays/dev")
    redis = next(d for d in docs if d["kind"] == "StatefulSet")
    service = next(d for d in docs if d["kind"] == "Service" and "redis" in d["metadata"]["name"])
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    url = secret["stringData"]["REDIS_URL"]
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
