"""Installed dependencies are at or above the releases that fixed advisories a proxy would hit.

``pip-audit`` needs its vulnerability services, which some build machines cannot reach (it then
reports "No known vulnerabilities found" without having checked anything). This table can fail
anywhere: raise a floor here, and in pyproject.toml, when an advisory lands.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

# package: (minimum version, why)
FLOORS = {
    "aiohttp": (
        "3.14.3",
        "client-side advisories fixed in 3.14.3 (request smuggling, header parsing)",
    ),
    "cryptography": ("42.0.4", "CVE-2024-26130 (PKCS#12 NULL dereference) and older OpenSSL fixes"),
    "redis": ("5.0.3", "CVE-2023-28858/28859: async cancellation could mix up responses"),
    "PyYAML": ("6.0", "full_load/unsafe loading advisories of 5.x"),
    "aiohttp-session": ("2.12.0", "current encrypted cookie storage"),
    "yarl": ("1.9.0", "URL parsing fixes that aiohttp 3.14 relies on"),
}


def as_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("package", list(FLOORS))
def test_installed_version_is_at_or_above_its_security_floor(package: str) -> None:
    floor, why = FLOORS[package]
    installed = version(package)
    assert as_tuple(installed) >= as_tuple(floor), f"{package} {installed} < {floor}: {why}"


def test_pyproject_asks_for_at_least_the_floor_of_aiohttp() -> None:
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert '"aiohttp>=3.14.3' in text
