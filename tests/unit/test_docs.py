"""The documentation and the code cannot drift: the configuration reference and the example files."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sidecar import config as c
from sidecar.config_loader import load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIG_DIR = ROOT / "config"
EXAMPLE_CONFIGS = ("sidecar.example.yaml", "dev.yaml", "demo.yaml")

# A table row whose first cell is a key written as `section.key`.
_REFERENCE_ROW = re.compile(r"^\|\s*`([a-z_]+)\.([a-z_0-9]+)`\s*\|", re.MULTILINE)
_REFERENCED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")

# Dummy values of the right shape for every variable an example config may reference.
DUMMY_ENV = {
    "QUOTA_CLIENT_ID": "quota_client_docs",
    "QUOTA_CLIENT_SECRET": "quota_secret_docs",
    "QUOTA_BASE_URL": "http://127.0.0.1:5181",
    "QUOTA_REDIRECT_URI": "http://localhost:5180/auth/quota/callback",
    "SESSION_SECRET": "docs-session-secret-of-at-least-32-chars",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "QUOTA_INTERNAL_API_KEY": "docs-internal-api-key-0123456789",
    "APP_URL": "http://127.0.0.1:3000",
    "DEMO_EVENTS_SECRET": "docs-demo-events-secret-0123456789abc",
    "QUOTA_TOKEN_KEY": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "QUOTA_TOKEN_KEY_OLD": "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def documented_keys() -> set[tuple[str, str]]:
    return set(_REFERENCE_ROW.findall(readme_text()))


def configurable_keys() -> set[tuple[str, str]]:
    return {
        (section, field.name)
        for section, cls in c.SECTIONS.items()
        for field in dataclasses.fields(cls)
    }


def test_the_readme_reference_documents_exactly_the_configurable_keys() -> None:
    documented, configurable = documented_keys(), configurable_keys()
    assert not configurable - documented, "keys missing from the README reference"
    assert not documented - configurable, "README reference lists keys the code does not have"


def test_the_readme_reference_has_one_table_per_section_in_code_order() -> None:
    order = [section for section, _ in _REFERENCE_ROW.findall(readme_text())]
    first_seen = list(dict.fromkeys(order))
    assert first_seen == list(c.SECTIONS)


@pytest.mark.parametrize("variable", sorted(c.ENV_ALIASES))
def test_every_environment_alias_is_documented(variable: str) -> None:
    section, key = c.ENV_ALIASES[variable]
    assert f"| `{variable}` | `{section}.{key}` |" in readme_text()


def test_the_generic_environment_override_is_documented() -> None:
    assert "QUOTA_SIDECAR__<SECTION>__<KEY>" in readme_text()


def test_every_example_config_the_readme_links_exists() -> None:
    text = readme_text()
    for name in EXAMPLE_CONFIGS:
        assert f"config/{name}" in text
        assert (CONFIG_DIR / name).is_file()


def referenced_variables(path: Path) -> set[str]:
    """Variables a config file needs: ``${VAR}`` without a default, outside comments."""
    needed = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        code = line.split("#", 1)[0]
        needed |= {name for name, default in _REFERENCED_VAR.findall(code) if not default}
    return needed


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_config_loads_with_the_variables_it_references(name: str) -> None:
    path = CONFIG_DIR / name
    needed = referenced_variables(path)
    assert needed <= set(DUMMY_ENV), f"give {sorted(needed - set(DUMMY_ENV))} a dummy value"
    config = load_config(path, {var: DUMMY_ENV[var] for var in needed})
    assert config.session.secret.reveal() == DUMMY_ENV["SESSION_SECRET"]


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_config_loads_with_every_documented_variable_set(name: str) -> None:
    load_config(CONFIG_DIR / name, DUMMY_ENV)


def test_the_production_example_spells_out_every_key_with_its_default() -> None:
    import yaml

    doc = yaml.safe_load((CONFIG_DIR / "sidecar.example.yaml").read_text(encoding="utf-8"))
    spelled_out = {(section, key) for section, keys in doc.items() for key in keys}
    assert spelled_out == configurable_keys()
    defaults = load_config(
        CONFIG_DIR / "sidecar.example.yaml",
        {
            var: DUMMY_ENV[var]
            for var in ("QUOTA_CLIENT_ID", "QUOTA_CLIENT_SECRET", "SESSION_SECRET")
        },
    )
    for section, cls in c.SECTIONS.items():
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING:
                continue  # required: comes from the environment
            assert getattr(getattr(defaults, section), field.name) == field.default, (
                f"{section}.{field.name} in sidecar.example.yaml differs from its default"
            )


def test_the_demo_config_matches_the_demo_layout() -> None:
    env = {name: DUMMY_ENV[name] for name in ("SESSION_SECRET", "DEMO_EVENTS_SECRET")}
    config = load_config(CONFIG_DIR / "demo.yaml", env)
    assert config.listen.public == "localhost:5180"
    assert config.listen.internal == "127.0.0.1:5183"
    assert config.upstream.url == "http://127.0.0.1:5182"
    assert config.quota.base_url == "http://127.0.0.1:5181"
    assert config.tokens.store == "memory"
    assert config.webhooks.secret is not None
    assert config.webhooks.secret.reveal() == "whsec_mock_quota_local_only"
    assert config.events.url == "http://127.0.0.1:5182/quota/events"


def test_the_readme_gives_the_two_quick_start_commands() -> None:
    text = readme_text()
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/quota-sidecar demo"
        in text
    )
    assert "\nscripts/check\n" in text


def test_the_readme_error_table_names_every_sidecar_error_code() -> None:
    from sidecar import errors

    raised = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.SidecarError)
        and cls not in (errors.ClientFault, errors.BadRequest, errors.ServiceFault)
    }
    text = readme_text()
    missing = {code for code in raised if f"| `{code}` |" not in text}
    assert not missing
