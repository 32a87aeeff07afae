"""The embedding cache: (model_key, sha256(embed text)) -> vector, looked up and written in bulk."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.db import Connection
from tasks.embed import Vectors

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
    """Store one embedded batch and commit it at once (binary COPY, duplicates ignored)."""
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS cache_incoming"
            " (content_hash bytea NOT NULL, embedding vector NOT NULL) ON COMMIT DELETE ROWS"
        )
        with conn.cursor() as cur, cur.copy(
            "COPY cache_incoming (content_hash, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bytea", "vector"])
            for content_hash, vector in zip(hashes, vectors):
                copy.write_row((content_hash, vector))
        conn.execute(
            "INSERT INTO embedding_cache (model_key, content_hash, embedding)"
            " SELECT %s, content_hash, embedding FROM cache_incoming ON CONFLICT DO NOTHING",
            (model_key,),
        )
