"""Read a sidecar's ``/metrics`` as Prometheus would, and wait on its values in tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: tuple[Sample, ...]

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample named ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


def parse(text: str) -> Scrape:
    return Scrape(
        text, tuple(s for family in text_string_to_metric_families(text) for s in family.samples)
    )


async def scrape(admin_url: str) -> Scrape:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{admin_url}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


async def wait_for_value(
    admin_url: str, name: str, expected: float, *, timeout_s: float = 5.0, **labels: str
) -> Scrape:
    """Scrape until ``name{labels}`` equals ``expected``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = await scrape(admin_url)
        if current.value(name, **labels) == expected:
            return current
        assert time.monotonic() < deadline, (
            f"{name}{labels} stayed {current.value(name, **labels)}, expected {expected}"
        )
        await asyncio.sleep(0.02)
