"""Fixtures: a real Postgres with pgvector (embedded, or TEST_DATABASE_URL), one fresh database per test."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from config.settings import Settings, load_settings
from tasks.db import Connection, apply_migrations, connect

CORPORA = Path(__file__).resolve().parent / "corpora"
"""Trimmed copies, with their licences, of the corpora the core tests and the quality gate read."""
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_CORPORA = SHARED / "corpora"
"""The full corpora beside the checkout, when present (prefect-docs is too large to ship)."""
pytest_plugins = [
    "tests.fix_prefect",  # a real `prefect server start` and its client calls
    "tests.fix_dask",  # a real Dask cluster
    "tests.fix_openai",  # the loopback embeddings API
]
TEMPLATE_DB = "ragingest_test_template"
_counter = itertools.count()

# Isolate Prefect from the machine's profile before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ragingest-test-prefect-")
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prefect sets up its console log handler on first use; let that be now, not inside a test
# that captures output (a later flow test would write to the closed capture).
import prefect.main  # noqa: E402, F401


def corpus_root(relative: str) -> Path:
    """A corpus folder: the copy in tests/corpora, else the one in ../shared; skips the test without one."""
    for base in (CORPORA, SHARED_CORPORA):
        if (base / relative).is_dir():
            return base / relative
    pytest.skip(f"corpus {relative} is not in tests/corpora nor at {SHARED_CORPORA / relative}")


@pytest.fixture(scope="session")
def server_url() -> str:
    """The admin URL of a server we may create databases on.

    The embedded server's data lives outside pytest's rotating temp folders and is
    removed when the test process exits.
    """
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        return given
    from tasks.db import embedded_server_url

    return embedded_server_url(Path(tempfile.mkdtemp(prefix="ragingest-test-pg-")), delete_on_exit=True)


def _with_database(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def template_url(server_url: str) -> str:
    """A migrated database every test database is cloned from."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = _with_database(server_url, TEMPLATE_DB)
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
    return url


@pytest.fixture
def database_url(server_url: str, template_url: str) -> Iterator[str]:
    name = f"ragingest_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def conn(database_url: str) -> Iterator[Connection]:
    with connect(database_url, autocommit=True) as connection:
        yield connection


def make_settings(database_url: str, **overrides: Any) -> Settings:
    """Test settings: the hash provider at 64 dimensions unless told otherwise."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "embedding_provider": "hash",
        "embedding_model": "test",
        "embedding_dimensions": 64,
        "embed_max_backoff_seconds": 0.5,
        "lock_timeout_seconds": 5,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    """The environment the CLI reads: this test's database and the hash provider at 64 dims."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("EMBEDDING_PROVIDER", "hash")
    monkeypatch.setenv("EMBEDDING_MODEL", "test")
    monkeypatch.setenv("EMBEDDING_DIMENSIONS", "64")
