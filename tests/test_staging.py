"""The run-keyed hand-off between prepare and load, and what a document was chunked with."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.ingest import run_ingest
from tasks.db import Connection, connect
from tasks.pool import open_pool
from tasks.prepare import ChunkSpec, plan_shards, prepare_shard, split_by_bytes
from tasks.records import FoundFile
from tasks.registry import live_models
from tests.conftest import make_settings
from tests.embedders import CountingFactory
from tests.test_ingest import PAGES, chunk_rows, ingest, write_tree


@pytest.fixture
def kb(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "kb", dict(PAGES))


def staged_rows(conn: Connection) -> tuple[int, int, int]:
    counts = [
        conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (test constants)
        for table in ("ingest_stage_runs", "ingest_stage_documents", "ingest_stage_chunks")
    ]
    return tuple(int(row[0]) if row else -1 for row in counts)  # type: ignore[return-value]


def test_a_chunker_change_rechunks_without_full_refresh_and_reuses_the_cache(
    database_url: str, kb: Path, conn: Connection
) -> None:
    factory = CountingFactory()
    first = ingest(make_settings(database_url), kb, factory)
    headings = chunk_rows(conn)
    windows = ingest(
        make_settings(database_url, chunker="tokens", token_window=32, token_overlap=8), kb, factory
    )
    assert windows["documents"]["changed"] == 4 and windows["chunks"]["written"] > 0
    assert chunk_rows(conn) != headings
    factory.reset()
    back = ingest(make_settings(database_url), kb, factory)
    assert back["documents"]["changed"] == 4 and back["chunks"]["written"] == first["chunks"]["written"]
    assert chunk_rows(conn) == headings
    assert factory.embedded == 0  # every headings chunk was still in the cache
    stored = conn.execute("SELECT DISTINCT chunk_config FROM documents").fetchall()
    assert stored == [("headings/v1/cap=512",)]


def test_a_lower_cap_rechunks_the_documents_it_affects(database_url: str, kb: Path) -> None:
    ingest(make_settings(database_url), kb)
    lowered = ingest(make_settings(database_url, chunk_max_tokens=64), kb)
    assert lowered["documents"]["changed"] == 4
    assert ingest(make_settings(database_url, chunk_max_tokens=64), kb)["documents"]["changed"] == 0


def test_a_dead_runs_staging_is_removed_and_never_loaded(
    database_url: str, kb: Path, conn: Connection
) -> None:
    dead = uuid.uuid4()
    conn.execute("INSERT INTO ingest_stage_runs (run_key, source) VALUES (%s, 'ghost')", (dead,))
    conn.execute(
        "INSERT INTO ingest_stage_documents (run_key, shard, path, namespace, title, tags, concept_keys,"
        " frontmatter, content_hash, chunk_config) VALUES (%s, 0, 'ghost.md', 'default', 'Ghost', '{}',"
        " '{}', '{}', '\\x00', 'x')",
        (dead,),
    )
    conn.execute(
        "INSERT INTO ingest_stage_chunks (run_key, shard, path, ordinal, heading_path, content, embed_hash,"
        " token_count, metadata) VALUES (%s, 0, 'ghost.md', 0, '{}', 'boo', '\\x00', 1, '{}')",
        (dead,),
    )
    summary = ingest(make_settings(database_url), kb)
    assert summary["documents"]["new"] == 4
    assert staged_rows(conn) == (0, 0, 0)
    assert conn.execute("SELECT count(*) FROM documents WHERE path = 'ghost.md'").fetchone() == (0,)


def test_a_live_runs_staging_is_left_alone(database_url: str, kb: Path, conn: Connection) -> None:
    """Another run still preparing keeps its rows while this one loads."""
    from tasks.staging import registered_run

    with connect(database_url) as other, registered_run(other, "elsewhere") as key:
        other.execute(
            "INSERT INTO ingest_stage_chunks (run_key, shard, path, ordinal, heading_path, content,"
            " embed_hash, token_count, metadata) VALUES (%s, 0, 'a.md', 0, '{}', 'x', '\\x00', 1, '{}')",
            (key,),
        )
        ingest(make_settings(database_url), kb)
        assert staged_rows(conn) == (1, 0, 1)
    assert staged_rows(conn) == (0, 0, 0)


def test_a_shard_prepared_twice_stages_its_rows_once(
    database_url: str, kb: Path, tmp_path: Path, conn: Connection
) -> None:
    settings = make_settings(database_url)
    (tmp_path / "empty").mkdir()
    ingest(settings, tmp_path / "empty")  # registers the model, caches nothing
    models = live_models(conn)
    files = [
        FoundFile(rel, str(kb / rel), (kb / rel).stat().st_size, b"\x00" * 32)
        for rel in sorted(PAGES)
        if rel != "notes/private.md"
    ]
    spec = ChunkSpec("headings", 512, 400, 50)
    run_key = uuid.uuid4()
    (shard,) = plan_shards(files, {}, run_key, spec, models, 10**9)
    factory = CountingFactory()
    with open_pool(database_url) as pool:
        first = prepare_shard(shard, settings, factory, pool)
        again = prepare_shard(shard, settings, factory, pool)
    assert first.chunks == again.chunks > 0
    staged = conn.execute(
        "SELECT count(*) FROM ingest_stage_chunks WHERE run_key = %s", (run_key,)
    ).fetchone()
    assert staged == (first.chunks,)
    assert factory.embedded == first.chunks  # the second attempt found every vector in the cache


def test_files_split_into_shards_by_bytes() -> None:
    files = [FoundFile(f"{i}.md", f"/x/{i}.md", size, b"") for i, size in enumerate([5, 5, 5, 20, 1])]
    groups = split_by_bytes(files, 10)
    assert [[f.path for f in group] for group in groups] == [["0.md", "1.md"], ["2.md"], ["3.md"], ["4.md"]]
    assert split_by_bytes([], 10) == []


# --- a dropped connection, through Prefect ---------------------------------------------


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.prefect
def test_a_connection_dropped_mid_stage_is_retried_on_a_fresh_connection(
    prefect_server: None, database_url: str, kb: Path, conn: Connection
) -> None:
    """pg_terminate_backend of the load stage's backend: the stage's retry completes the run."""
    from prefect import flow

    from tasks.stage import run_as_task

    killed: list[int] = []
    stop = threading.Event()

    def kill_the_load() -> None:
        with connect(database_url) as monitor:
            while not stop.is_set() and not killed:
                row = monitor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'INSERT INTO chunks%%' AND state = 'active'"
                ).fetchone()
                if row is not None:
                    monitor.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    killed.append(row[0])

    @flow(persist_result=False)
    def sync() -> dict[str, Any]:
        return run_ingest(make_settings(database_url), kb, runner=run_as_task, embedder_factory=SlowInsert())

    watcher = threading.Thread(target=kill_the_load)
    watcher.start()
    try:
        summary = sync()
    finally:
        stop.set()
        watcher.join()
    assert killed, "the load's INSERT was never seen running"
    assert summary["documents"]["new"] == 4 and summary["chunks"]["total"] == len(chunk_rows(conn)) > 0
    assert staged_rows(conn) == (0, 0, 0)


class SlowInsert(CountingFactory):
    """Makes the load's INSERT last long enough to be seen: a trigger that sleeps once per row."""

    def __call__(self, model: Any, settings: Any) -> Any:
        with connect(settings.database_url.get_secret_value()) as conn:
            conn.execute(
                "CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE OR REPLACE TRIGGER slow_insert BEFORE INSERT ON chunks"
                " FOR EACH ROW EXECUTE FUNCTION slow_insert()"
            )
        return super().__call__(model, settings)


def test_errors_are_classified_by_class() -> None:
    import psycopg
    from psycopg import errors

    from tasks.errors import TerminalError, TransientError, is_transient

    assert is_transient(errors.AdminShutdown()) and is_transient(errors.DeadlockDetected())
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert is_transient(TransientError("busy", run_key="k"))
    assert not is_transient(errors.UniqueViolation()) and not is_transient(TerminalError("bad", path="a.md"))
    assert not is_transient(errors.LockNotAvailable()) and not is_transient(ValueError("x"))
