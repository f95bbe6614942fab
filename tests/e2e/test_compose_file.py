"""compose.yaml: a development PostgreSQL 15 and the jobs' image pointed at it.

There is no Docker engine (nor the compose plugin) where the tests run, so the
file is checked with real parsers instead: yamllint with the repository's
settings, PyYAML, and SQLAlchemy for the database URL it hands the jobs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url
from yamllint import linter as yamllint_linter
from yamllint.config import YamlLintConfig

from billing_jobs.db.engine import make_engine

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"

# Keys of the Compose specification this file may use; a typo fails here.
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "healthcheck",
    "depends_on",
    "profiles",
    "restart",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def test_compose_file_passes_yamllint_with_the_repository_settings() -> None:
    config = YamlLintConfig(file=str(REPO / ".yamllint.yaml"))
    problems = list(yamllint_linter.run(COMPOSE.read_text(encoding="utf-8"), config, str(COMPOSE)))
    assert [f"{p.line}:{p.column} {p.message}" for p in problems] == []


def test_compose_file_uses_only_known_compose_keys(compose: dict[str, Any]) -> None:
    assert set(compose) <= TOP_LEVEL
    assert set(compose["services"]) == {"postgres", "billing-jobs"}
    for name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, name
    assert set(compose["services"]["postgres"]["healthcheck"]) <= HEALTHCHECK_KEYS


def test_postgres_service_is_version_15_on_localhost_with_a_named_volume(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:15"
    assert "profiles" not in pg  # `docker compose up -d postgres` starts it alone
    assert set(pg["environment"]) >= {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"}
    assert pg["ports"] == ["127.0.0.1:5432:5432"]  # not reachable from other machines
    volume, _, target = pg["volumes"][0].partition(":")
    assert target == "/var/lib/postgresql/data"
    assert volume in compose["volumes"]  # a named volume, not a host folder


def test_postgres_health_is_pg_isready_for_its_own_user_and_database(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    words = test[1].split()
    assert words[0] == "pg_isready"
    assert words[words.index("-U") + 1] == pg["environment"]["POSTGRES_USER"]
    assert words[words.index("-d") + 1] == pg["environment"]["POSTGRES_DB"]


def test_jobs_service_is_the_image_in_a_profile_and_waits_for_a_healthy_database(
    compose: dict[str, Any],
) -> None:
    job = compose["services"]["billing-jobs"]
    assert job["profiles"] == ["job"]
    assert job["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert (REPO / job["build"] / "Dockerfile").is_file()
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert job["image"] == f"billing-jobs:{version}"


def test_jobs_database_url_names_the_postgres_service_and_its_credentials(compose: dict[str, Any]) -> None:
    env = compose["services"]["postgres"]["environment"]
    url = make_url(compose["services"]["billing-jobs"]["environment"]["BILLING_DB_URL"])
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    engine = make_engine(url.render_as_string(hide_password=False))  # the jobs accept it (no connection made)
    try:
        assert engine.dialect.name == "postgresql"
    finally:
        engine.dispose()
