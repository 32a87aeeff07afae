"""Read paths as a read-only role: SELECT and USAGE only, on a migrated database.

`search`, `status`, `models list`, `eval` and `db verify` must work without the right to
create anything; only ingest, backfill and `db migrate` migrate. A database whose schema is
behind is named, with the command that brings it up to date, and nothing is created.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli.main import main
from tests.test_ingest import PAGES, write_tree

SCENARIO = "Read-only role"

_roles = itertools.count()
PASSWORD = "read-only-test"


@pytest.fixture
def reader_url(database_url: str, server_url: str) -> Iterator[str]:
    """A LOGIN role with CONNECT, USAGE on the schema and SELECT on its tables, nothing else."""
    role = f"ragingest_reader_{os.getpid()}_{next(_roles)}"
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), PASSWORD))
        owner.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(str(dbname)), sql.Identifier(role)
            )
        )
        owner.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        owner.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role))
        )
        owner.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(role)
            )
        )
        cannot_create = owner.execute(
            "SELECT NOT has_schema_privilege(%s, 'public', 'CREATE')", (role,)
        ).fetchone()
        assert cannot_create == (True,)
    yield psycopg.conninfo.make_conninfo(database_url, user=role, password=PASSWORD)
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def loaded(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """The pages ingested by the owner (the `env` database), as a reader then finds them."""
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == 0
    capsys.readouterr()
    return kb


def as_reader(monkeypatch: pytest.MonkeyPatch, reader_url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", reader_url)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "permission denied" not in captured.err
    return json.loads(captured.out)


def test_search_status_models_and_eval_work_as_a_read_only_role(
    loaded: Path,
    reader_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    as_reader(monkeypatch, reader_url)

    status = run_json(capsys, "status", "--json")
    assert isinstance(status, dict) and status["documents"] == {"active": 4, "stale": 0}
    models = run_json(capsys, "models", "list", "--json")
    assert isinstance(models, list) and models[0]["model_key"] == "hash:test:64"
    for mode in ("lexical", "vector", "hybrid"):
        result = run_json(capsys, "search", "rollback command", "--mode", mode, "--json")
        assert isinstance(result, dict) and result["results"], mode
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        json.dumps({"id": "rollback", "query": "revert a release", "expected_paths": ["guides/deploy.md"]})
        + "\n"
    )
    report = run_json(capsys, "eval", str(cases), "--no-prefect", "--json")
    assert isinstance(report, dict) and report["cases"] == 1 and len(report["results"]) == 3


def test_db_verify_and_a_no_op_migrate_work_as_a_read_only_role(
    loaded: Path,
    reader_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    as_reader(monkeypatch, reader_url)
    assert main(["db", "migrate"]) == 0
    assert "applied 0 migration(s)" in capsys.readouterr().out
    assert main(["db", "verify"]) == 0
    assert capsys.readouterr().out.endswith("schema ok\n")

    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute("ALTER TABLE documents DROP CONSTRAINT documents_source_path_key")
    assert main(["db", "verify"]) == 1  # the reader sees the damage too, through temporary tables
    out = capsys.readouterr().out
    assert "constraint documents_source_path_key on documents (UNIQUE (source, path)) is missing" in out


def test_a_schema_behind_is_named_with_the_command_and_nothing_is_created(
    loaded: Path,
    reader_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute("DROP INDEX chunks_token_count")
        owner.execute("DELETE FROM schema_migrations WHERE version = 2")
    as_reader(monkeypatch, reader_url)
    for argv in (["status"], ["search", "deploy"], ["models", "list"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "002_search not applied" in err and "ragingest db migrate" in err, argv
        assert "permission denied" not in err
    monkeypatch.setenv("DATABASE_URL", database_url)  # the owner reads without migrating too
    assert main(["status"]) == 1
    capsys.readouterr()
    with psycopg.connect(database_url, autocommit=True) as owner:
        assert owner.execute("SELECT to_regclass('chunks_token_count')").fetchone() == (None,)
        assert owner.execute("SELECT max(version) FROM schema_migrations").fetchone() != (2,)
    assert main(["db", "migrate"]) == 0
    assert "applied 1 migration(s): 002_search" in capsys.readouterr().out
    as_reader(monkeypatch, reader_url)
    assert main(["status"]) == 0
