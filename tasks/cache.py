"""The embedding cache: (model_key, sha256(embed text)) -> vector, looked up and written in bulk."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from psycopg import errors

from tasks.db import Connection
from tasks.embed import Embedder, EmbedItem, EmbedPolicy, EmbedStats, RateBudget, Vectors, embed_items

LOOKUP_BATCH = 10_000


def cached_hashes(conn: Connection, model_key: str, hashes: Sequence[bytes]) -> set[bytes]:
    """Which of `hashes` already have a vector for `model_key`. Moves no vectors."""
    found: set[bytes] = set()
    unique = list(dict.fromkeys(hashes))
    for start in range(0, len(unique), LOOKUP_BATCH):
        rows = conn.execute(
            "SELECT content_hash FROM embedding_cache WHERE model_key = %s AND content_hash = ANY(%s)",
            (model_key, unique[start : start + LOOKUP_BATCH]),
        )
        found.update(bytes(row[0]) for row in rows)
    return found


def fetch_vectors(conn: Connection, model_key: str, hashes: Sequence[bytes]) -> dict[bytes, Vectors]:
    rows = conn.execute(
        "SELECT content_hash, embedding FROM embedding_cache WHERE model_key = %s AND content_hash = ANY(%s)",
        (model_key, list(hashes)),
    )
    return {bytes(h): np.asarray(v, dtype=np.float32) for h, v in rows}


def write_vectors(conn: Connection, model_key: str, hashes: Sequence[bytes], vectors: Vectors) -> None:
    """Store one embedded batch and commit it at once (binary COPY, duplicates ignored).

    The batch is COPYed straight into the cache. Only when a hash is there already
    (another run wrote it meanwhile) does it go again through a staging table and
    `ON CONFLICT DO NOTHING`: the straight COPY costs half as much per batch.
    """
    try:
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(
                "COPY embedding_cache (model_key, content_hash, embedding) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["text", "bytea", "vector"])
            for content_hash, vector in zip(hashes, vectors, strict=True):
                copy.write_row((model_key, content_hash, vector))
    except errors.UniqueViolation:
        _write_skipping_duplicates(conn, model_key, hashes, vectors)


def _write_skipping_duplicates(
    conn: Connection, model_key: str, hashes: Sequence[bytes], vectors: Vectors
) -> None:
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS cache_incoming"
            " (content_hash bytea NOT NULL, embedding vector NOT NULL) ON COMMIT DELETE ROWS"
        )
        with (
            conn.cursor() as cur,
            cur.copy("COPY cache_incoming (content_hash, embedding) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["bytea", "vector"])
            for content_hash, vector in zip(hashes, vectors, strict=True):
                copy.write_row((content_hash, vector))
        conn.execute(
            "INSERT INTO embedding_cache (model_key, content_hash, embedding)"
            " SELECT %s, content_hash, embedding FROM cache_incoming ON CONFLICT DO NOTHING",
            (model_key,),
        )


@dataclass(frozen=True, slots=True)
class CacheOutcome:
    hits: int
    misses: int
    lookup_seconds: float


async def embed_missing(
    conn: Connection,
    embedder: Embedder,
    items: Sequence[EmbedItem],
    policy: EmbedPolicy,
    budget: RateBudget,
    stats: EmbedStats,
) -> CacheOutcome:
    """Look the items up in the cache, embed only the misses, and write each batch back as it returns.

    The one path by which ingest and backfill pay for vectors: a crash loses at most the
    batches in flight.
    """
    started = time.perf_counter()
    hits = cached_hashes(conn, embedder.model_key, [item.embed_hash for item in items])
    lookup_seconds = time.perf_counter() - started
    misses = [item for item in items if item.embed_hash not in hits]
    if misses:

        def write(hashes: Sequence[bytes], vectors: Vectors) -> None:
            write_vectors(conn, embedder.model_key, hashes, vectors)

        await embed_items(embedder, misses, policy, write, stats=stats, budget=budget)
    return CacheOutcome(len(items) - len(misses), len(misses), lookup_seconds)
