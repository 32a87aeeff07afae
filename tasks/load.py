"""Load: binary COPY into session staging tables, then one transaction swaps the rows in.

Vectors never travel through the staging tables: they are already in
`embedding_cache` (the embed stage wrote them there), so the swap joins them in
on the server. A warm-cache bulk load therefore moves no vector through Python.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg import sql
from psycopg.types.json import Jsonb

from tasks.db import LOAD_LOCK, Connection, index_validity
from tasks.records import Chunk, ParsedDocument
from tasks.registry import EmbeddingModel, create_hnsw_index, drop_hnsw_index

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The swap could not complete; the transaction was rolled back."""


class RunLocked(RuntimeError):
    """Another ingest or backfill holds the load lock."""


@dataclass(slots=True)
class IndexPlan:
    strategy: str
    drop: bool
    reason: str


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


# --- the lock -------------------------------------------------------------------


def acquire_load_lock(conn: Connection, timeout_seconds: float) -> None:
    """Session advisory lock; waits up to `timeout_seconds` for another run to finish."""
    from psycopg import errors

    timeout = f"{int(timeout_seconds * 1000)}ms"
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(timeout)))
            conn.execute("SELECT pg_advisory_lock(%s)", (LOAD_LOCK,))
    except errors.LockNotAvailable:
        raise RunLocked(
            f"another ingest or backfill is loading into this database; waited {timeout_seconds:g} s "
            "(raise RAGINGEST_LOCK_TIMEOUT_SECONDS to wait longer)"
        ) from None


def release_load_lock(conn: Connection) -> None:
    if not conn.closed and not conn.broken:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOAD_LOCK,))


# --- staging --------------------------------------------------------------------

_STAGE_DDL = """
DROP TABLE IF EXISTS stage_documents, stage_chunks;
CREATE TEMP TABLE stage_documents (
    path text NOT NULL, namespace text NOT NULL, title text NOT NULL, description text,
    tags text[] NOT NULL, concept_keys text[] NOT NULL, frontmatter jsonb NOT NULL,
    content_hash bytea NOT NULL
);
CREATE TEMP TABLE stage_chunks (
    path text NOT NULL, ordinal integer NOT NULL, heading_path text[] NOT NULL,
    content text NOT NULL, embed_hash bytea NOT NULL, token_count integer NOT NULL,
    metadata jsonb NOT NULL
);
"""
_DOC_TYPES = ["text", "text", "text", "text", "text[]", "text[]", "jsonb", "bytea"]
_CHUNK_TYPES = ["text", "int4", "text[]", "text", "bytea", "int4", "jsonb"]


def create_staging(conn: Connection) -> None:
    """Empty session-local staging tables (they vanish with the connection)."""
    with conn.transaction():
        conn.execute(_STAGE_DDL)


def stage_documents(conn: Connection, docs: Sequence[tuple[ParsedDocument, Sequence[Chunk]]]) -> int:
    """COPY documents and their chunks into staging; committed, but not yet visible to anyone."""
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY stage_documents (path, namespace, title, description, tags, concept_keys,"
            " frontmatter, content_hash) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_DOC_TYPES)
            for doc, _ in docs:
                copy.write_row(
                    (
                        doc.path,
                        doc.namespace,
                        doc.title,
                        doc.description,
                        list(doc.tags),
                        list(doc.concept_keys),
                        Jsonb(dict(doc.frontmatter)),
                        doc.content_hash,
                    )
                )
        rows = 0
        with cur.copy(
            "COPY stage_chunks (path, ordinal, heading_path, content, embed_hash, token_count,"
            " metadata) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_CHUNK_TYPES)
            for doc, chunks in docs:
                for chunk in chunks:
                    copy.write_row(
                        (
                            doc.path,
                            chunk.ordinal,
                            list(chunk.heading_path),
                            chunk.content,
                            chunk.embed_hash,
                            chunk.token_count,
                            Jsonb(chunk_metadata(doc, chunk)),
                        )
                    )
                    rows += 1
    return rows


def chunk_metadata(doc: ParsedDocument, chunk: Chunk) -> dict[str, object]:
    """Denormalised facts for filters and lexical search (title and headings are weighted)."""
    return {
        "title": doc.title,
        "headings": " > ".join(chunk.heading_path),
        "namespace": doc.namespace,
        "tags": list(doc.tags),
        "path": doc.path,
        "embed_header": chunk.embed_header,
    }


# --- the swap -------------------------------------------------------------------


def choose_index_plan(
    strategy: str, *, rows_changed: int, table_rows: int, drop_fraction: float, drop_min_rows: int
) -> IndexPlan:
    """`auto` drops the HNSW index when the change is a large share of the table."""
    if strategy == "drop":
        return IndexPlan(strategy, True, "forced")
    if strategy == "keep":
        return IndexPlan(strategy, False, "forced")
    share = rows_changed / max(table_rows, 1)
    drop = rows_changed >= drop_min_rows and share >= drop_fraction
    if table_rows == 0:
        reason = f"first load of {rows_changed} rows (drop from {drop_min_rows})"
    else:
        reason = f"{rows_changed} rows change, {share:.1%} of {table_rows} (threshold {drop_fraction:.0%})"
    return IndexPlan(strategy, drop, reason)


def count_chunks(conn: Connection) -> int:
    row = conn.execute("SELECT count(*) FROM chunks").fetchone()
    return int(row[0]) if row else 0


def swap_in(
    conn: Connection,
    *,
    source: str,
    models: Sequence[EmbeddingModel],
    deleted_paths: Sequence[str],
    stale_paths: Sequence[str],
    index_plan: IndexPlan,
    maintenance_work_mem: str,
    parallel_workers: int,
) -> LoadResult:
    """One transaction: upsert documents, replace their chunks, delete the gone ones, index.

    Any failure rolls everything back, the dropped index included.
    """
    result = LoadResult()
    started = time.perf_counter()
    assert conn.autocommit, "swap_in needs an autocommit connection to own a real transaction"
    # A column still being backfilled gets its index when the backfill completes.
    indexed = [m for m in models if m.status != "backfilling"]
    with conn.transaction():
        if index_plan.drop:
            for model in indexed:
                drop_hnsw_index(conn, model)
                result.indexes_dropped += 1
        load_staged(
            conn,
            source=source,
            models=models,
            deleted_paths=deleted_paths,
            stale_paths=stale_paths,
            result=result,
        )
        result.load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result.indexes_built = _ensure_indexes(conn, indexed, maintenance_work_mem, parallel_workers)
        result.index_seconds = time.perf_counter() - started
        result.chunks_total = count_chunks(conn)
    return result


def load_staged(
    conn: Connection,
    *,
    source: str,
    models: Sequence[EmbeddingModel],
    deleted_paths: Sequence[str],
    stale_paths: Sequence[str],
    result: LoadResult,
) -> None:
    """The rows part of the swap, indexes left alone; runs inside the caller's transaction."""
    _upsert_documents(conn, source)
    result.chunks_deleted = _delete_replaced_chunks(conn, source, deleted_paths)
    result.documents_deleted = _delete_documents(conn, source, deleted_paths)
    result.chunks_written = _insert_chunks(conn, source, models)
    _mark_stale(conn, source, stale_paths)


def _upsert_documents(conn: Connection, source: str) -> None:
    conn.execute(
        "INSERT INTO documents AS d (source, path, namespace, title, description, tags, concept_keys,"
        " frontmatter, content_hash, status)"
        " SELECT %s, path, namespace, title, description, tags, concept_keys, frontmatter,"
        " content_hash, 'active' FROM stage_documents"
        " ON CONFLICT (source, path) DO UPDATE SET namespace = EXCLUDED.namespace,"
        " title = EXCLUDED.title, description = EXCLUDED.description, tags = EXCLUDED.tags,"
        " concept_keys = EXCLUDED.concept_keys, frontmatter = EXCLUDED.frontmatter,"
        " content_hash = EXCLUDED.content_hash, status = 'active', last_seen_at = now(),"
        " updated_at = now()",
        (source,),
    )


def _delete_replaced_chunks(conn: Connection, source: str, deleted_paths: Sequence[str]) -> int:
    """Remove the old chunks of restaged documents and of deleted ones; returns how many."""
    replaced = conn.execute(
        "DELETE FROM chunks c USING documents d WHERE c.document_id = d.id AND d.source = %s"
        " AND (d.path IN (SELECT path FROM stage_documents) OR d.path = ANY(%s))",
        (source, list(deleted_paths)),
    )
    return replaced.rowcount


def _delete_documents(conn: Connection, source: str, paths: Sequence[str]) -> int:
    if not paths:
        return 0
    return conn.execute(
        "DELETE FROM documents WHERE source = %s AND path = ANY(%s)", (source, list(paths))
    ).rowcount


def _insert_chunks(conn: Connection, source: str, models: Sequence[EmbeddingModel]) -> int:
    columns = [sql.Identifier(m.column_name) for m in models]
    aliases = [sql.Identifier(f"cache_{i}") for i in range(len(models))]
    vectors = [
        sql.SQL("{alias}.embedding::{type}").format(alias=alias, type=m.column_type)
        for alias, m in zip(aliases, models, strict=True)
    ]
    joins = [
        sql.SQL(
            " JOIN embedding_cache {alias}"
            " ON {alias}.model_key = {key} AND {alias}.content_hash = s.embed_hash"
        ).format(alias=alias, key=sql.Literal(m.model_key))
        for alias, m in zip(aliases, models, strict=True)
    ]
    query = sql.SQL(
        "INSERT INTO chunks (document_id, ordinal, heading_path, content, embed_hash, token_count,"
        " metadata{columns}) SELECT d.id, s.ordinal, s.heading_path, s.content, s.embed_hash,"
        " s.token_count, s.metadata{vectors} FROM stage_chunks s"
        " JOIN documents d ON d.source = {source} AND d.path = s.path{joins}"
    ).format(
        columns=sql.SQL("").join(sql.SQL(", ") + c for c in columns),
        vectors=sql.SQL("").join(sql.SQL(", ") + v for v in vectors),
        source=sql.Literal(source),
        joins=sql.SQL("").join(joins),
    )
    written = conn.execute(query).rowcount
    staged_row = conn.execute("SELECT count(*) FROM stage_chunks").fetchone()
    staged = int(staged_row[0]) if staged_row else 0
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


def _ensure_indexes(
    conn: Connection, models: Iterable[EmbeddingModel], maintenance_work_mem: str, workers: int
) -> int:
    """Build every missing or INVALID HNSW index, with the memory and workers the build needs."""
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
    conn.execute(sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(workers)))
    present = index_validity(conn)
    built = 0
    for model in models:
        if present.get(model.index_name) is False:
            log.warning("index %s is INVALID; rebuilding it", model.index_name)
            drop_hnsw_index(conn, model)
        if present.get(model.index_name) is not True:
            create_hnsw_index(conn, model)
            built += 1
    return built


def vacuum_analyze(conn: Connection) -> float:
    """VACUUM cannot run inside a transaction: `conn` is in autocommit mode."""
    started = time.perf_counter()
    conn.execute("VACUUM (ANALYZE) chunks, documents")
    return time.perf_counter() - started
