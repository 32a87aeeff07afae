"""The hand-off between prepare and load: run-keyed staging tables, written by binary COPY.

Every run registers a run key and holds an advisory lock for as long as it
lives. Shards (in this process or on any Dask worker) COPY their document and
chunk rows under that key; a retried shard first deletes its own rows, so
preparing a shard is idempotent. Vectors never come here: they are in
`embedding_cache` already. The load transaction reads `WHERE run_key = …` and
deletes what it read; rows of a run that died are removed by the next run that
takes the load lock, and are never loaded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg import sql
from psycopg.types.json import Jsonb

from tasks.db import Connection
from tasks.records import Chunk, ParsedDocument

RUN_LOCK_CLASS = 7406  # advisory lock (RUN_LOCK_CLASS, lock_id) held by a live run

_COPY_DOCUMENTS = (
    "COPY ingest_stage_documents (run_key, shard, path, namespace, title, description, tags,"
    " concept_keys, frontmatter, content_hash, planned_hash, chunk_config) FROM STDIN (FORMAT BINARY)"
)
_DOC_TYPES = ["uuid", "int4", "text", "text", "text", "text", "text[]", "text[]", "jsonb"]
_DOC_TYPES += ["bytea", "bytea", "text"]
_COPY_CHUNKS = (
    "COPY ingest_stage_chunks (run_key, shard, path, ordinal, heading_path, content, embed_hash,"
    " token_count, metadata) FROM STDIN (FORMAT BINARY)"
)
_CHUNK_TYPES = ["uuid", "int4", "text", "int4", "text[]", "text", "bytea", "int4", "jsonb"]


@dataclass(frozen=True, slots=True)
class StagingTarget:
    """Where one shard writes: the run's key, the shard's number, and what the plan knew."""

    run_key: uuid.UUID
    shard: int
    chunk_config: str
    planned_hashes: Mapping[str, bytes]
    """path -> the stored content hash the plan compared against (absent for new files)."""


@contextmanager
def registered_run(conn: Connection, source: str) -> Iterator[uuid.UUID]:
    """A run key, alive (its lock held on `conn`) until the block ends; its staging goes with it."""
    run_key = uuid.uuid4()
    row = conn.execute(
        "INSERT INTO ingest_stage_runs (run_key, source) VALUES (%s, %s) RETURNING lock_id",
        (run_key, source),
    ).fetchone()
    assert row is not None
    conn.execute("SELECT pg_advisory_lock(%s, %s)", (RUN_LOCK_CLASS, row[0]))
    try:
        yield run_key
    finally:
        if not conn.closed and not conn.broken:
            discard_run(conn, run_key)
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (RUN_LOCK_CLASS, row[0]))


def discard_run(conn: Connection, run_key: uuid.UUID) -> None:
    """Delete a run's staging rows and its registration (its own, after a load or a failure)."""
    with conn.transaction():
        for table in ("ingest_stage_chunks", "ingest_stage_documents", "ingest_stage_runs"):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE run_key = %s").format(sql.Identifier(table)), (run_key,)
            )


def remove_abandoned_runs(conn: Connection) -> int:
    """Staging rows of runs whose lock nobody holds (they died); call it holding the load lock."""
    dead = conn.execute(
        "DELETE FROM ingest_stage_runs r WHERE NOT EXISTS (SELECT 1 FROM pg_locks l"
        " WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objid = r.lock_id::oid"
        " AND l.objsubid = 2) RETURNING run_key",
        (RUN_LOCK_CLASS,),
    ).fetchall()
    conn.execute(
        "DELETE FROM ingest_stage_chunks s WHERE NOT EXISTS"
        " (SELECT 1 FROM ingest_stage_runs r WHERE r.run_key = s.run_key)"
    )
    conn.execute(
        "DELETE FROM ingest_stage_documents s WHERE NOT EXISTS"
        " (SELECT 1 FROM ingest_stage_runs r WHERE r.run_key = s.run_key)"
    )
    return len(dead)


def clear_shard(conn: Connection, target: StagingTarget) -> None:
    """Remove what an earlier attempt of this shard staged, so a retry starts clean."""
    with conn.transaction():
        for table in ("ingest_stage_chunks", "ingest_stage_documents"):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE run_key = %s AND shard = %s").format(sql.Identifier(table)),
                (target.run_key, target.shard),
            )


def stage_documents(
    conn: Connection, target: StagingTarget, docs: Sequence[tuple[ParsedDocument, Sequence[Chunk]]]
) -> int:
    """COPY documents and their chunks into staging, committed; returns the chunk rows written."""
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(_COPY_DOCUMENTS) as copy:
            copy.set_types(_DOC_TYPES)
            for doc, _ in docs:
                copy.write_row(_document_row(target, doc))
        rows = 0
        with cur.copy(_COPY_CHUNKS) as copy:
            copy.set_types(_CHUNK_TYPES)
            for doc, chunks in docs:
                for chunk in chunks:
                    copy.write_row(_chunk_row(target, doc, chunk))
                    rows += 1
    return rows


def _document_row(target: StagingTarget, doc: ParsedDocument) -> tuple[object, ...]:
    return (
        target.run_key,
        target.shard,
        doc.path,
        doc.namespace,
        doc.title,
        doc.description,
        list(doc.tags),
        list(doc.concept_keys),
        Jsonb(dict(doc.frontmatter)),
        doc.content_hash,
        target.planned_hashes.get(doc.path),
        target.chunk_config,
    )


def _chunk_row(target: StagingTarget, doc: ParsedDocument, chunk: Chunk) -> tuple[object, ...]:
    return (
        target.run_key,
        target.shard,
        doc.path,
        chunk.ordinal,
        list(chunk.heading_path),
        chunk.content,
        chunk.embed_hash,
        chunk.token_count,
        Jsonb(chunk_metadata(doc, chunk)),
    )


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
