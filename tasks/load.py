"""Load: one transaction swaps a run's staged rows in, under the load lock.

The load lock is held only here (and by each backfill batch's UPDATE): runs
prepare in parallel and queue only for the swap. Inside the lock the plan is
checked again, so two runs of one source never interleave: a document the
other run already loaded with the same content is skipped, and one it loaded
with other content stops this run with a message to rerun.

Vectors never travel through staging: they are in `embedding_cache` already,
and the swap joins them in on the server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg import errors, sql

from config.settings import Settings
from tasks.db import LOAD_LOCK, Connection
from tasks.index import IndexPlan, count_chunks, drop_indexes, ensure_indexes, plan_for_change
from tasks.pool import ConnectionSource
from tasks.registry import EmbeddingModel
from tasks.staging import remove_abandoned_runs


class LoadError(RuntimeError):
    """The swap could not complete; the transaction was rolled back."""


class RunLocked(RuntimeError):
    """Another ingest or backfill holds the load lock."""


class ConcurrentChange(LoadError):
    """Another run loaded other content for this run's documents after this run planned."""


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What a run asks the swap to do, besides loading its staged rows."""

    run_key: uuid.UUID
    source: str
    models: Sequence[EmbeddingModel]
    deleted_paths: Sequence[str]
    stale_paths: Sequence[str]


@dataclass(slots=True)
class LoadResult:
    chunks_written: int = 0
    chunks_deleted: int = 0
    chunks_total: int = 0
    documents_deleted: int = 0
    indexes_dropped: int = 0
    indexes_built: int = 0
    load_seconds: float = 0.0
    index_seconds: float = 0.0
    index_plan: IndexPlan | None = None


# --- the lock -------------------------------------------------------------------


def _lock_timeout(seconds: float) -> sql.Composed:
    return sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(seconds * 1000)}ms"))


def _locked_message(seconds: float) -> str:
    return (
        f"another ingest or backfill is loading into this database; waited {seconds:g} s "
        "(raise RAGINGEST_LOCK_TIMEOUT_SECONDS to wait longer)"
    )


@contextmanager
def load_lock(conn: Connection, timeout_seconds: float) -> Iterator[None]:
    """A transaction that holds the load lock until it commits or rolls back."""
    with conn.transaction():
        try:
            conn.execute(_lock_timeout(timeout_seconds))
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOAD_LOCK,))
        except errors.LockNotAvailable:
            raise RunLocked(_locked_message(timeout_seconds)) from None
        conn.execute("SET LOCAL lock_timeout = DEFAULT")
        yield


def acquire_load_lock(conn: Connection, timeout_seconds: float) -> None:
    """Hold the load lock for the session (an operator's maintenance, or a test's stand-in run)."""
    try:
        with conn.transaction():
            conn.execute(_lock_timeout(timeout_seconds))
            conn.execute("SELECT pg_advisory_lock(%s)", (LOAD_LOCK,))
    except errors.LockNotAvailable:
        raise RunLocked(_locked_message(timeout_seconds)) from None


def release_load_lock(conn: Connection) -> None:
    if not conn.closed and not conn.broken:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOAD_LOCK,))


# --- the swap -------------------------------------------------------------------


def swap_in(conn: Connection, request: LoadRequest, settings: Settings) -> LoadResult:
    """One transaction: re-check the plan, upsert documents, replace chunks, delete, index.

    Any failure rolls everything back, the dropped indexes included.
    """
    assert conn.autocommit, "swap_in needs an autocommit connection to own a real transaction"
    result = LoadResult()
    started = time.perf_counter()
    # A column still being backfilled gets its index when the backfill completes.
    indexed = [m for m in request.models if m.status != "backfilling"]
    with load_lock(conn, settings.lock_timeout_seconds):
        remove_abandoned_runs(conn)
        _reconcile(conn, request)
        result.index_plan = plan_for_change(
            conn,
            settings,
            request.source,
            _staged_chunks(conn, request.run_key),
            _replaced_paths(conn, request),
        )
        if result.index_plan.drop:
            result.indexes_dropped = drop_indexes(conn, indexed)
        load_rows(conn, request, result)
        result.load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result.indexes_built = ensure_indexes(
            conn, indexed, settings.maintenance_work_mem, settings.max_parallel_maintenance_workers
        )
        result.index_seconds = time.perf_counter() - started
        result.chunks_total = count_chunks(conn)
    return result


def load_rows(conn: Connection, request: LoadRequest, result: LoadResult) -> None:
    """The rows part of the swap; runs inside the caller's transaction, then drops the staging."""
    run_key, source = request.run_key, request.source
    _upsert_documents(conn, run_key, source)
    result.chunks_deleted = _delete_replaced_chunks(conn, run_key, source, request.deleted_paths)
    result.documents_deleted = _delete_documents(conn, source, request.deleted_paths)
    result.chunks_written = _insert_chunks(conn, run_key, source, request.models)
    _mark_stale(conn, source, request.stale_paths)
    conn.execute("DELETE FROM ingest_stage_chunks WHERE run_key = %s", (run_key,))
    conn.execute("DELETE FROM ingest_stage_documents WHERE run_key = %s", (run_key,))


def _reconcile(conn: Connection, request: LoadRequest) -> None:
    """The plan again, inside the lock: skip what another run loaded identically, stop on a conflict."""
    conflict = conn.execute(
        "SELECT s.path FROM ingest_stage_documents s JOIN documents d ON d.source = %s AND d.path = s.path"
        " WHERE s.run_key = %s AND d.content_hash IS DISTINCT FROM s.planned_hash"
        " AND (d.content_hash <> s.content_hash OR d.chunk_config IS DISTINCT FROM s.chunk_config)"
        " UNION ALL SELECT s.path FROM ingest_stage_documents s WHERE s.run_key = %s"
        " AND s.planned_hash IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM documents d WHERE d.source = %s AND d.path = s.path) LIMIT 1",
        (request.source, request.run_key, request.run_key, request.source),
    ).fetchone()
    if conflict is not None:
        raise ConcurrentChange(
            f"another run changed {conflict[0]!r} of source {request.source!r} after this run planned; "
            "nothing was written: run again (embeddings already paid for are cached)"
        )
    skipped = conn.execute(
        "DELETE FROM ingest_stage_documents s USING documents d WHERE s.run_key = %s AND d.source = %s"
        " AND d.path = s.path AND d.content_hash = s.content_hash AND d.chunk_config = s.chunk_config"
        " AND d.content_hash IS DISTINCT FROM s.planned_hash RETURNING s.path",
        (request.run_key, request.source),
    ).fetchall()
    if skipped:
        conn.execute(
            "DELETE FROM ingest_stage_chunks WHERE run_key = %s AND path = ANY(%s)",
            (request.run_key, [row[0] for row in skipped]),
        )


def _staged_chunks(conn: Connection, run_key: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*) FROM ingest_stage_chunks WHERE run_key = %s", (run_key,)).fetchone()
    return int(row[0]) if row else 0


def _replaced_paths(conn: Connection, request: LoadRequest) -> list[str]:
    rows = conn.execute("SELECT path FROM ingest_stage_documents WHERE run_key = %s", (request.run_key,))
    return [row[0] for row in rows] + list(request.deleted_paths)


def _upsert_documents(conn: Connection, run_key: uuid.UUID, source: str) -> None:
    conn.execute(
        "INSERT INTO documents AS d (source, path, namespace, title, description, tags, concept_keys,"
        " frontmatter, content_hash, chunk_config, status)"
        " SELECT %s, path, namespace, title, description, tags, concept_keys, frontmatter,"
        " content_hash, chunk_config, 'active' FROM ingest_stage_documents WHERE run_key = %s"
        " ON CONFLICT (source, path) DO UPDATE SET namespace = EXCLUDED.namespace,"
        " title = EXCLUDED.title, description = EXCLUDED.description, tags = EXCLUDED.tags,"
        " concept_keys = EXCLUDED.concept_keys, frontmatter = EXCLUDED.frontmatter,"
        " content_hash = EXCLUDED.content_hash, chunk_config = EXCLUDED.chunk_config,"
        " status = 'active', last_seen_at = now(), updated_at = now()",
        (source, run_key),
    )


def _delete_replaced_chunks(
    conn: Connection, run_key: uuid.UUID, source: str, deleted_paths: Sequence[str]
) -> int:
    """Remove the old chunks of restaged documents and of deleted ones; returns how many."""
    replaced = conn.execute(
        "DELETE FROM chunks c USING documents d WHERE c.document_id = d.id AND d.source = %s"
        " AND (d.path IN (SELECT path FROM ingest_stage_documents WHERE run_key = %s)"
        " OR d.path = ANY(%s))",
        (source, run_key, list(deleted_paths)),
    )
    return replaced.rowcount


def _delete_documents(conn: Connection, source: str, paths: Sequence[str]) -> int:
    if not paths:
        return 0
    return conn.execute(
        "DELETE FROM documents WHERE source = %s AND path = ANY(%s)", (source, list(paths))
    ).rowcount


def _insert_chunks(
    conn: Connection, run_key: uuid.UUID, source: str, models: Sequence[EmbeddingModel]
) -> int:
    aliases = [sql.Identifier(f"cache_{i}") for i in range(len(models))]
    query = sql.SQL(
        "INSERT INTO chunks (document_id, ordinal, heading_path, content, embed_hash, token_count,"
        " metadata{columns}) SELECT d.id, s.ordinal, s.heading_path, s.content, s.embed_hash,"
        " s.token_count, s.metadata{vectors} FROM ingest_stage_chunks s"
        " JOIN documents d ON d.source = {source} AND d.path = s.path{joins} WHERE s.run_key = {run_key}"
    ).format(
        columns=sql.SQL("").join(sql.SQL(", ") + sql.Identifier(m.column_name) for m in models),
        vectors=sql.SQL("").join(
            sql.SQL(", {}.embedding::{}").format(alias, m.column_type)
            for alias, m in zip(aliases, models, strict=True)
        ),
        source=sql.Literal(source),
        joins=sql.SQL("").join(
            sql.SQL(
                " JOIN embedding_cache {a} ON {a}.model_key = {key} AND {a}.content_hash = s.embed_hash"
            ).format(a=alias, key=sql.Literal(m.model_key))
            for alias, m in zip(aliases, models, strict=True)
        ),
        run_key=sql.Literal(str(run_key)),
    )
    written = conn.execute(query).rowcount
    staged = _staged_chunks(conn, run_key)
    if written != staged:
        raise LoadError(
            f"{staged - written} of {staged} staged chunks have no cached vector for one of "
            f"{', '.join(m.slug for m in models)}; nothing was written"
        )
    return written


def _mark_stale(conn: Connection, source: str, paths: Sequence[str]) -> None:
    conn.execute(
        "UPDATE documents SET status = CASE WHEN path = ANY(%s) THEN 'stale' ELSE 'active' END"
        " WHERE source = %s AND (status = 'stale' OR path = ANY(%s))",
        (list(paths), source, list(paths)),
    )


def load_run(connections: ConnectionSource, request: LoadRequest, settings: Settings) -> LoadResult:
    """The load stage: the swap on a connection of its own (a retry borrows a fresh one)."""
    with connections.connection() as conn:
        return swap_in(conn, request, settings)


def nothing_to_load(connections: ConnectionSource) -> LoadResult:
    """The figures of a run whose plan is empty: no swap, no lock, only the table's size."""
    with connections.connection() as conn:
        return LoadResult(chunks_total=count_chunks(conn))
