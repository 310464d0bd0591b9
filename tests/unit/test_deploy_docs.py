"""docs/DEPLOY.md and the code cannot drift: every metric documented, every name it uses real."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import yaml

from sidecar.metrics import REFRESH_OUTCOMES, Metrics
from sidecar.worker_metrics import WorkerProcesses

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "DEPLOY.md"
_NAME = re.compile(r"\bquota_sidecar_[a-z_]+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exposed_families() -> set[str]:
    """Family names as they appear on /metrics (counters with their ``_total``), with the two
    that only ``--workers`` adds."""
    with tempfile.TemporaryDirectory() as empty:
        workers = list(WorkerProcesses(Path(empty)).collect())
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in [*Metrics(process=False).registry.collect(), *workers]
        if family.name.startswith("quota_sidecar_")
    }


def base(name: str) -> str:
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def test_every_metric_has_a_row_in_the_deploy_guide() -> None:
    text = DEPLOY.read_text(encoding="utf-8")
    for family in exposed_families():
        assert f"| `{family}` |" in text, family


def test_every_metric_name_the_guide_uses_exists() -> None:
    known = {base(f) for f in exposed_families()}
    for name in set(_NAME.findall(DEPLOY.read_text(encoding="utf-8"))):
        assert base(name) in known, name


def test_the_guide_explains_every_refresh_outcome() -> None:
    text = DEPLOY.read_text(encoding="utf-8")
    for outcome in REFRESH_OUTCOMES:
        assert f"`{outcome}`" in text


def test_the_alert_rules_in_the_guide_are_valid_yaml_with_an_expression_each() -> None:
    text = DEPLOY.read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "PrometheusRule" in b]
    rules = yaml.safe_load(block)["spec"]["groups"][0]["rules"]
    assert len(rules) >= 5
    assert all(rule["alert"].startswith("QuotaSidecar") and rule["expr"] for rule in rules)
