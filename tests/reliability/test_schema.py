"""`db verify` and `db migrate --repair` against damage done by hand: every kind of object the
migrations make is dropped or changed, named, re-created, and an ingest then works again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest

from cli.main import main
from tasks.db import SQL_DIR, Connection
from tests.test_ingest import PAGES, write_tree

SCENARIO = "Damaged schema"

# (damage done by hand, what `db verify` must say)
REPAIRABLE = [
    pytest.param(
        "ALTER TABLE documents DROP CONSTRAINT documents_source_path_key",
        "constraint documents_source_path_key on documents (UNIQUE (source, path)) is missing",
        id="unique-constraint",
    ),
    pytest.param("DROP INDEX chunks_token_count", "index chunks_token_count is missing", id="index"),
    pytest.param("DROP INDEX chunks_tsv_gin", "index chunks_tsv_gin is missing", id="gin-index"),
    pytest.param("DROP TABLE ingest_failures", "table ingest_failures is missing", id="table"),
    pytest.param("DROP TABLE ingest_stage_chunks", "table ingest_stage_chunks is missing", id="unlogged"),
    pytest.param("ALTER TABLE documents DROP COLUMN tags", "column documents.tags is missing", id="column"),
    pytest.param("ALTER TABLE chunks DROP COLUMN tsv", "column chunks.tsv is missing", id="generated-column"),
    pytest.param(
        "ALTER TABLE chunks DROP CONSTRAINT chunks_document_id_fkey",
        "constraint chunks_document_id_fkey on chunks (FOREIGN KEY (document_id) REFERENCES documents(id)"
        " ON DELETE CASCADE) is missing",
        id="foreign-key",
    ),
    pytest.param(
        "ALTER TABLE embedding_models DROP CONSTRAINT embedding_models_slug_check",
        "constraint embedding_models_slug_check on embedding_models",
        id="check-constraint",
    ),
    pytest.param(
        "ALTER TABLE documents ALTER COLUMN status DROP DEFAULT",
        "column documents.status has default (none), expected 'active'::text",
        id="default",
    ),
    pytest.param(
        "ALTER TABLE chunks ALTER COLUMN content DROP NOT NULL",
        "column chunks.content allows NULL, expected NOT NULL",
        id="not-null",
    ),
]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def ingest_json(capsys: pytest.CaptureFixture[str], kb: Path) -> tuple[int, dict[str, object]]:
    code = main(["ingest", str(kb), "--no-prefect", "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


@pytest.mark.parametrize(("damage", "named"), REPAIRABLE)
def test_verify_names_the_damage_repair_restores_it_and_ingest_works(
    env: None,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    named: str,
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    assert ingest_json(capsys, kb)[0] == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(damage)

    code, out = run_cli(capsys, "db", "verify")
    assert code == 1 and named in out and "ragingest db migrate --repair" in out
    code, out = run_cli(capsys, "db", "migrate")  # nothing pending, but it does not say all is well
    assert code == 1 and "applied 0 migration(s)" in out and named in out

    code, out = run_cli(capsys, "db", "migrate", "--repair")
    assert code == 0, out
    assert f"repaired: {named}" in out and "schema ok" in out
    assert run_cli(capsys, "db", "verify") == (0, "schema ok\n")
    assert run_cli(capsys, "db", "migrate", "--repair")[0] == 0  # idempotent: nothing left to do

    (kb / "guides/deploy.md").write_text("# Deploying\n\nA new body, so the upsert runs.\n")
    (kb / "extra.md").write_text("# Extra\n\nA new page.\n")
    code, summary = ingest_json(capsys, kb)
    documents = summary["documents"]
    assert code == 0 and documents == {**documents, "new": 1, "changed": 1, "failed": 0}  # type: ignore[dict-item]


def test_an_ingest_against_a_dropped_unique_constraint_points_at_verify(
    env: None, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE documents DROP CONSTRAINT documents_source_path_key")
    code, out = run_cli(capsys, "ingest", str(kb), "--no-prefect")
    assert code == 1 and "run `ragingest db verify`" in out


def test_a_repaired_unlogged_table_is_unlogged_again(
    env: None, conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    conn.execute("DROP TABLE ingest_stage_runs")
    assert run_cli(capsys, "db", "migrate", "--repair")[0] == 0
    row = conn.execute("SELECT relpersistence FROM pg_class WHERE relname = 'ingest_stage_runs'").fetchone()
    assert row == ("u",)
    identity = conn.execute(
        "SELECT attidentity FROM pg_attribute WHERE attrelid = 'ingest_stage_runs'::regclass"
        " AND attname = 'lock_id'"
    ).fetchone()
    assert identity == ("a",)


def test_a_wrong_typed_column_is_named_and_refused_and_the_rest_repaired(
    env: None, conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    conn.execute("ALTER TABLE chunks ALTER COLUMN token_count TYPE bigint")
    conn.execute("DROP INDEX chunks_tsv_gin")

    code, out = run_cli(capsys, "db", "verify")
    assert code == 1 and "column chunks.token_count is bigint, expected integer" in out

    code, out = run_cli(capsys, "db", "migrate", "--repair")
    assert code == 1
    assert "repaired: index chunks_tsv_gin is missing" in out
    assert (
        "not repaired: column chunks.token_count is bigint, expected integer:"
        " change its type to integer by hand" in out
    )
    assert "1 problem(s) left" in out
    assert conn.execute("SELECT to_regclass('chunks_tsv_gin') IS NOT NULL").fetchone() == (True,)
    column = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'chunks'::regclass AND attname = 'token_count'"
    ).fetchone()
    assert column == ("bigint",)  # left as it was


def test_a_repair_that_fails_changes_nothing(
    env: None, conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    conn.execute("ALTER TABLE documents DROP CONSTRAINT documents_source_path_key")
    conn.execute("DROP INDEX chunks_token_count")
    for _ in range(2):  # a duplicate the unique constraint cannot be added over
        conn.execute(
            "INSERT INTO documents (source, path, namespace, title, content_hash)"
            " VALUES ('s', 'a.md', 'default', 'A', '\\x00')"
        )

    code, out = run_cli(capsys, "db", "migrate", "--repair")
    assert code == 1
    assert "could not repair constraint documents_source_path_key" in out and "nothing was changed" in out
    assert conn.execute("SELECT to_regclass('chunks_token_count')").fetchone() == (None,)
    leftovers = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'ragingest_expected_%'")
    assert leftovers.fetchone() == (0,)


def test_a_missing_table_is_named_once_not_with_each_of_its_columns(
    env: None, conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    conn.execute("DROP TABLE chunks")
    code, out = run_cli(capsys, "db", "verify")
    assert code == 1
    assert "table chunks is missing" in out
    assert "chunks_tsv_gin" not in out and "column chunks." not in out
    code, out = run_cli(capsys, "db", "migrate", "--repair")
    assert code == 0, out
    assert run_cli(capsys, "db", "verify") == (0, "schema ok\n")


def test_a_new_migration_is_covered_without_listing_it_anywhere(conn: Connection, tmp_path: Path) -> None:
    from tasks.schema import find_schema_problems

    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    (folder / "999_extra.sql").write_text(
        "CREATE TABLE extra (id integer PRIMARY KEY, note text NOT NULL DEFAULT '');\n"
        "CREATE INDEX documents_title ON documents (title);\n"
    )
    messages = [p.message for p in find_schema_problems(conn, folder) if p.shown]
    assert messages == ["table extra is missing", "index documents_title is missing"]
    assert [p.message for p in find_schema_problems(conn)] == []


def test_verify_leaves_no_scratch_schema_and_changes_nothing(conn: Connection) -> None:
    from tasks.schema import find_schema_problems

    before = conn.execute("SELECT count(*) FROM pg_class").fetchone()
    assert find_schema_problems(conn) == []
    assert conn.execute("SELECT count(*) FROM pg_class").fetchone() == before
    leftovers = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'ragingest_expected_%'")
    assert leftovers.fetchone() == (0,)


def test_a_models_hnsw_index_is_named_and_rebuilt(
    env: None, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    assert ingest_json(capsys, kb)[0] == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX chunks_emb_test_64_hnsw")
    named = "index chunks_emb_test_64_hnsw of model test_64 is missing"
    code, out = run_cli(capsys, "db", "verify")
    assert code == 1 and named in out
    code, out = run_cli(capsys, "db", "migrate", "--repair")
    assert code == 0 and f"repaired: {named}" in out, out
    assert run_cli(capsys, "db", "verify") == (0, "schema ok\n")
