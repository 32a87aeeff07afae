"""Backfill: fill a new model's column in resumable, keyset-paginated batches, then index it.

Every batch commits on its own. Vectors go to `embedding_cache` as each embedding
request returns, and the column is filled by an `UPDATE … FROM embedding_cache`
on the server, so a run killed at any point redoes only the batches that never
reached the cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import errors, sql

from config.settings import Settings
from tasks.cache import cached_hashes, write_vectors
from tasks.db import LOAD_LOCK, Connection, index_validity
from tasks.embed import (
    Embedder,
    EmbedItem,
    EmbedPolicy,
    EmbedStats,
    RateBudget,
    TerminalEmbeddingError,
    embed_items,
)
from tasks.load import RunLocked
from tasks.records import join_embed_text, sha256_text
from tasks.registry import EmbeddingModel, ModelConfigError, create_hnsw_index, drop_hnsw_index, get_model

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class BackfillError(RuntimeError):
    """A backfill cannot go on; the message names the model and what to do."""


@dataclass(slots=True)
class BackfillStats:
    rows_missing_at_start: int = 0
    rows_filled: int = 0
    batches: int = 0
    cache_hits: int = 0
    embed: EmbedStats = field(default_factory=EmbedStats)


@dataclass(frozen=True, slots=True)
class BackfillEstimate:
    rows: int
    tokens: int
    estimated_cost_usd: float


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    embed_hash: bytes
    embed_text: str
    token_count: int


async def check_dimensions(embedder: Embedder) -> None:
    """Embed one probe text: a model that answers with other dimensions fails before any write."""
    vectors = await embedder.embed(["dimension probe"])
    if vectors.shape != (1, embedder.dimensions):
        raise TerminalEmbeddingError(
            f"the model answers with vectors of shape {vectors.shape[1:]}, but {embedder.dimensions} "
            "dimensions were asked for; fix --dimensions",
            model_key=embedder.model_key,
        )


def estimate(conn: Connection, model: EmbeddingModel | None, cost_per_million: float) -> BackfillEstimate:
    """Rows still to fill and their tokens (all chunks when the column does not exist yet)."""
    where: sql.Composable = sql.SQL("")
    if model is not None:
        where = sql.SQL(" WHERE {} IS NULL").format(sql.Identifier(model.column_name))
    row = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(token_count), 0) FROM chunks{}").format(where)
    ).fetchone()
    rows, tokens = (int(row[0]), int(row[1])) if row else (0, 0)
    return BackfillEstimate(rows, tokens, round(tokens * cost_per_million / 1_000_000, 6))


def hold_backfill_lock(conn: Connection, model: EmbeddingModel) -> None:
    """One backfill per model at a time: a second one is refused at once."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(hashtext('ragingest-backfill'), hashtext(%s))", (model.slug,)
    ).fetchone()
    if not row or not row[0]:
        raise BackfillError(f"a backfill of {model.slug} is already running")


def fill_column(
    conn: Connection,
    cache_conn: Connection,
    model: EmbeddingModel,
    embedder: Embedder,
    settings: Settings,
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> BackfillStats:
    """Fill every NULL of the model's column; loops until none is left (ingests may add rows)."""
    stats = BackfillStats(rows_missing_at_start=estimate(conn, model, 0.0).rows)
    policy = EmbedPolicy.from_settings(settings, embedder)
    budget = RateBudget(settings.requests_per_minute, settings.tokens_per_minute)
    total = max(stats.rows_missing_at_start, 1)
    while True:
        after_id, filled_this_pass = 0, 0
        while rows := _next_batch(conn, model, after_id, batch_size):
            filled_this_pass += _fill_batch(
                conn, cache_conn, model, embedder, rows, policy, budget, stats, settings
            )
            after_id = rows[-1].id
            if progress is not None:
                progress(min(stats.rows_filled, total), total)
        if filled_this_pass == 0 and estimate(conn, model, 0.0).rows == 0:
            return stats
        if filled_this_pass == 0:
            raise BackfillError(f"rows of {model.column_name} stay NULL after a full pass; see the log")


def _next_batch(conn: Connection, model: EmbeddingModel, after_id: int, limit: int) -> list[_Row]:
    rows = conn.execute(
        sql.SQL(
            "SELECT id, embed_hash, metadata ->> 'embed_header', content, token_count FROM chunks"
            " WHERE {} IS NULL AND id > %s ORDER BY id LIMIT %s"
        ).format(sql.Identifier(model.column_name)),
        (after_id, limit),
    ).fetchall()
    batch = []
    for chunk_id, digest, header, content, tokens in rows:
        text = join_embed_text(header or "", content)
        if sha256_text(text) != bytes(digest):
            raise BackfillError(
                f"chunk {chunk_id}: its stored text does not rebuild the text that was embedded; "
                "re-ingest its document with --full-refresh"
            )
        batch.append(_Row(chunk_id, bytes(digest), text, tokens))
    return batch


def _fill_batch(
    conn: Connection,
    cache_conn: Connection,
    model: EmbeddingModel,
    embedder: Embedder,
    rows: Sequence[_Row],
    policy: EmbedPolicy,
    budget: RateBudget,
    stats: BackfillStats,
    settings: Settings,
) -> int:
    unique = {row.embed_hash: EmbedItem(row.embed_hash, row.embed_text, row.token_count) for row in rows}
    hits = cached_hashes(cache_conn, model.model_key, list(unique))
    stats.cache_hits += len(hits)
    misses = [item for digest, item in unique.items() if digest not in hits]
    if misses:

        def write(hashes: Sequence[bytes], vectors: Any) -> None:
            write_vectors(cache_conn, model.model_key, hashes, vectors)

        asyncio.run(embed_items(embedder, misses, policy, write, stats=stats.embed, budget=budget))
    filled = _update_from_cache(conn, model, [row.id for row in rows], settings.lock_timeout_seconds)
    stats.rows_filled += filled
    stats.batches += 1
    return filled


def _update_from_cache(conn: Connection, model: EmbeddingModel, ids: list[int], lock_timeout: float) -> int:
    """Write the batch under the load lock, so an ingest's swap and a batch never interleave."""
    column = sql.Identifier(model.column_name)
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout * 1000)}ms"))
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOAD_LOCK,))
            return conn.execute(
                sql.SQL(
                    "UPDATE chunks c SET {column} = e.embedding::{type} FROM embedding_cache e"
                    " WHERE c.id = ANY(%s) AND c.{column} IS NULL AND e.model_key = %s"
                    " AND e.content_hash = c.embed_hash"
                ).format(column=column, type=model.column_type),
                (ids, model.model_key),
            ).rowcount
    except errors.LockNotAvailable:
        raise RunLocked(
            f"an ingest held the load lock for over {lock_timeout:g} s; the backfill of {model.slug} "
            "stopped and resumes where it stopped when run again"
        ) from None


def build_index(conn: Connection, model: EmbeddingModel, settings: Settings) -> bool:
    """CREATE INDEX CONCURRENTLY (readers and writers go on); an INVALID leftover is rebuilt."""
    state = index_validity(conn).get(model.index_name)
    if state is True:
        return False
    if state is False:
        log.warning("index %s is INVALID (an interrupted build); rebuilding it", model.index_name)
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(model.index_name)))
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(settings.maintenance_work_mem)))
    conn.execute(
        sql.SQL("SET max_parallel_maintenance_workers = {}").format(
            sql.Literal(settings.max_parallel_maintenance_workers)
        )
    )
    try:
        create_hnsw_index(conn, model, concurrently=True)
    finally:
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")
    return True


def set_status(conn: Connection, slug: str, status: str) -> None:
    conn.execute(
        "UPDATE embedding_models SET status = %s, updated_at = now() WHERE slug = %s", (status, slug)
    )


def activate(conn: Connection, slug: str, *, force: bool = False) -> EmbeddingModel:
    """Make the model the primary one; refuses an incomplete column or a missing index unless forced."""
    model = _live_model(conn, slug)
    if not force:
        missing = estimate(conn, model, 0.0).rows
        index_ok = index_validity(conn).get(model.index_name) is True
        if missing or not index_ok:
            raise ModelConfigError(
                f"model {slug} is not complete ({missing} chunks without a vector, index "
                f"{'present' if index_ok else 'missing or invalid'}); finish its backfill or pass --force"
            )
    with conn.transaction():
        conn.execute(
            "UPDATE embedding_models SET status = 'ready', updated_at = now() WHERE status = 'active'"
        )
        set_status(conn, slug, "active")
    activated = get_model(conn, slug)
    assert activated is not None
    return activated


def retire(conn: Connection, slug: str) -> EmbeddingModel:
    """Drop the model's column and index; refuses the primary model."""
    model = _live_model(conn, slug)
    if model.status == "active":
        raise ModelConfigError(f"model {slug} is the primary one; activate another model before retiring it")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOAD_LOCK,))
        drop_hnsw_index(conn, model)
        conn.execute(
            sql.SQL("ALTER TABLE chunks DROP COLUMN IF EXISTS {}").format(sql.Identifier(model.column_name))
        )
        set_status(conn, slug, "retired")
    retired = get_model(conn, slug)
    assert retired is not None
    return retired


def _live_model(conn: Connection, slug: str) -> EmbeddingModel:
    model = get_model(conn, slug)
    if model is None:
        raise ModelConfigError(f"no model {slug!r} is registered (see `ragingest models list`)")
    if model.status == "retired":
        raise ModelConfigError(f"model {slug} is retired")
    return model
