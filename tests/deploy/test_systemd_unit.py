"""The systemd unit: runs the installed command, stops gracefully in time, and is hardened."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import ShutdownConfig

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "quota-sidecar.service"


def unit() -> dict[str, dict[str, list[str]]]:
    """Section → key → every value (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_the_unit_runs_quota_sidecar_with_its_config_and_secrets_from_files() -> None:
    service = unit()["Service"]
    (command,) = service["ExecStart"]
    assert command.split()[0].endswith("/bin/quota-sidecar")
    assert command.split()[1] == "run"
    assert service["EnvironmentFile"] == ["/etc/quota-sidecar/env"]
    assert "PYTHONDONTWRITEBYTECODE=1" in service["Environment"][0].split()
    assert service["Restart"] == ["on-failure"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_gives_the_graceful_shutdown_its_whole_time() -> None:
    service = unit()["Service"]
    defaults = ShutdownConfig()
    assert service["KillSignal"] == ["SIGTERM"]
    assert float(service["TimeoutStopSec"][0]) > defaults.drain_delay_s + defaults.grace_s + 5


def test_the_unit_is_hardened() -> None:
    service = unit()["Service"]
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert service[key] == [value], key
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in service["SystemCallFilter"]
    assert "User" not in service, "DynamicUser: no fixed account, never root"
