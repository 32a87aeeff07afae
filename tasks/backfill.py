"""Backfill: fill a new model's column in resumable, keyset-paginated batches, then index it.

Every batch commits on its own. Vectors go to `embedding_cache` as each embedding
request returns, and the column is filled by an `UPDATE … FROM embedding_cache`
on the server, so a run killed at any point redoes only the batches that never
reached the cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from psycopg import sql

from config.settings import Settings
from tasks.cache import embed_missing, write_vectors
from tasks.db import LOAD_LOCK, Connection, index_validity
from tasks.embed import (
    Embedder,
    EmbedItem,
    EmbedPolicy,
    EmbedStats,
    RateBudget,
    embed_items,
)
from tasks.index import set_build_memory
from tasks.load import RunLocked, load_lock
from tasks.records import join_embed_text, sha256_text
from tasks.registry import (
    EmbeddingModel,
    ModelConfigError,
    Precision,
    check_column,
    choose_precision,
    create_hnsw_index,
    drop_hnsw_index,
    get_model,
)
from tasks.tokens import count_tokens

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


MAX_BATCH_SIZE = 10_000
MAX_ID = 2**63 - 1
"""The largest chunk id, so an open-ended range is `[lo, MAX_ID)`."""
PROBE_TEXT = "dimension probe"
PROVIDERS = ("openai", "sentence-transformers", "hash")

T = TypeVar("T")


def validate_request(
    provider: str, model: str, dimensions: int, precision: Precision | None, batch_size: int
) -> Precision:
    """Refuse a bad backfill request before anything is registered or spent; returns the precision."""
    if provider not in PROVIDERS:
        raise ModelConfigError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if not model.strip():
        raise ModelConfigError("the model name is empty")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ModelConfigError(f"batch size {batch_size} is out of range: use 1 to {MAX_BATCH_SIZE:,} rows")
    return choose_precision(dimensions, precision)


def check_existing(conn: Connection, existing: EmbeddingModel | None, precision: Precision | None) -> None:
    """A registered live model must match what is asked, and its column what the registry says."""
    if existing is None or existing.status == "retired":
        return
    if precision is not None and precision != existing.precision:
        raise ModelConfigError(
            f"model {existing.slug} is registered with precision {existing.precision}, not {precision}; "
            f"drop --precision, or retire {existing.slug} and backfill it again"
        )
    check_column(conn, existing)


def run_on_own_loop(embedder: Embedder, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` on a fresh event loop, then close the embedder's client on that same loop.

    An async HTTP client cannot outlive the loop it was made on: one loop per
    stage, one client per loop, closed before the loop is.
    """

    async def main() -> T:
        try:
            return await work()
        finally:
            await embedder.aclose()

    return asyncio.run(main())


async def check_dimensions(embedder: Embedder, settings: Settings) -> None:
    """Embed one probe text, retried like any batch: other dimensions fail before any write."""
    policy = EmbedPolicy.from_settings(settings, embedder)
    probe = EmbedItem(sha256_text(PROBE_TEXT), PROBE_TEXT, count_tokens(PROBE_TEXT))
    await embed_items(embedder, [probe], policy, _discard)


def probe_dimensions(embedder: Embedder, settings: Settings) -> None:
    """`check_dimensions` on its own loop, its client closed at the end."""
    run_on_own_loop(embedder, lambda: check_dimensions(embedder, settings))


def _discard(hashes: Sequence[bytes], vectors: Any) -> None:
    """The probe's vector is not a chunk's: it is checked, never stored."""


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


def count_over_limit(
    conn: Connection, model: EmbeddingModel | None, embedder: Embedder, *, page: int = 2000
) -> int:
    """Chunks still to fill whose embed text is over the embedder's input limit, in its own tokens.

    A model with a smaller input than the one the chunks were cut for embeds only their
    start; the dry run says how many before anything is spent.
    """
    where: sql.Composable = sql.SQL("")
    if model is not None:
        where = sql.SQL(" AND {} IS NULL").format(sql.Identifier(model.column_name))
    query = sql.SQL(
        "SELECT id, metadata ->> 'embed_header', content FROM chunks WHERE id > %s{} ORDER BY id LIMIT %s"
    ).format(where)
    over, after = 0, 0
    while rows := conn.execute(query, (after, page)).fetchall():
        texts = [join_embed_text(header or "", content) for _, header, content in rows]
        over += sum(1 for count in embedder.count_tokens(texts) if count > embedder.max_input_tokens)
        after = rows[-1][0]
    return over


def hold_backfill_lock(conn: Connection, model_key: str, name: str) -> None:
    """One backfill per model at a time: a second one is refused at once.

    Keyed by the model key, so it can be taken before the model is registered.
    Held by the session, so it goes when the connection does.
    """
    row = conn.execute(
        "SELECT pg_try_advisory_lock(hashtext('ragingest-backfill'), hashtext(%s))", (model_key,)
    ).fetchone()
    if not row or not row[0]:
        raise BackfillError(f"a backfill of {name} is already running")


@dataclass(frozen=True, slots=True)
class IdRange:
    """Chunk ids `lo <= id < hi`, holding `rows` NULLs of the column when planned."""

    lo: int
    hi: int
    rows: int


def plan_id_ranges(conn: Connection, model: EmbeddingModel, n: int) -> list[IdRange]:
    """Split the column's NULL rows into at most `n` id ranges of about equal row counts.

    The ranges are contiguous, from the first NULL id to past the last, so each can
    be filled on its own (`fill_range`), in any order or at once. Rows added later
    lie past the last range: plan again until nothing is left.
    """
    if n < 1:
        raise ValueError(f"cannot split into {n} ranges")
    bounds = conn.execute(
        sql.SQL(
            "SELECT min(id), max(id), count(*) FROM (SELECT id, ntile(%s) OVER (ORDER BY id) AS part"
            " FROM chunks WHERE {} IS NULL) AS parts GROUP BY part ORDER BY part"
        ).format(sql.Identifier(model.column_name)),
        (n,),
    ).fetchall()
    return contiguous_ranges([(int(lo), int(hi), int(rows)) for lo, hi, rows in bounds])


def contiguous_ranges(parts: Sequence[tuple[int, int, int]]) -> list[IdRange]:
    """`(first id, last id, rows)` of consecutive parts as half-open ranges with no gap between."""
    return [
        IdRange(first, parts[i + 1][0] if i + 1 < len(parts) else last + 1, rows)
        for i, (first, last, rows) in enumerate(parts)
    ]


@dataclass(slots=True)
class _FillJob:
    """What every batch of one fill needs; made and used on one event loop."""

    conn: Connection
    cache_conn: Connection
    model: EmbeddingModel
    embedder: Embedder
    settings: Settings
    batch_size: int
    stats: BackfillStats
    progress: Progress | None
    budget: RateBudget = field(init=False)
    policy: EmbedPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = EmbedPolicy.from_settings(self.settings, self.embedder)
        self.budget = RateBudget(self.settings.requests_per_minute, self.settings.tokens_per_minute)

    def write(self, hashes: Sequence[bytes], vectors: Any) -> None:
        write_vectors(self.cache_conn, self.model.model_key, hashes, vectors)


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
    """Fill every NULL of the model's column; loops until none is left (ingests may add rows).

    The whole fill runs on one event loop, with one API client and one rate budget.
    """
    stats = BackfillStats(rows_missing_at_start=estimate(conn, model, 0.0).rows)
    job = _FillJob(conn, cache_conn, model, embedder, settings, batch_size, stats, progress)
    return run_on_own_loop(embedder, lambda: _fill_until_complete(job))


def fill_range(
    conn: Connection,
    cache_conn: Connection,
    model: EmbeddingModel,
    embedder: Embedder,
    settings: Settings,
    lo: int,
    hi: int,
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> BackfillStats:
    """Fill the NULLs with `lo <= id < hi` in one pass, each batch committed on its own.

    A unit of work for one task: its own event loop, client and rate budget, and
    the same load lock per batch as `fill_column`, so ranges may run side by side.
    """
    stats = BackfillStats(rows_missing_at_start=_missing_between(conn, model, lo, hi))
    job = _FillJob(conn, cache_conn, model, embedder, settings, batch_size, stats, progress)

    async def one_pass() -> BackfillStats:
        await _fill_pass(job, lo, hi)
        return stats

    return run_on_own_loop(embedder, one_pass)


async def _fill_until_complete(job: _FillJob) -> BackfillStats:
    while True:
        filled = await _fill_pass(job, 0, MAX_ID)
        if filled == 0 and estimate(job.conn, job.model, 0.0).rows == 0:
            return job.stats
        if filled == 0:
            raise BackfillError(f"rows of {job.model.column_name} stay NULL after a full pass; see the log")


async def _fill_pass(job: _FillJob, lo: int, hi: int) -> int:
    """One keyset pass over `lo <= id < hi`; the blocking database work runs between awaits."""
    after_id, filled = lo - 1, 0
    total = max(job.stats.rows_missing_at_start, 1)
    while rows := _next_batch(job.conn, job.model, after_id, hi, job.batch_size):
        filled += await _fill_batch(job, rows)
        after_id = rows[-1].id
        if job.progress is not None:
            job.progress(min(job.stats.rows_filled, total), total)
    return filled


def _missing_between(conn: Connection, model: EmbeddingModel, lo: int, hi: int) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM chunks WHERE {} IS NULL AND id >= %s AND id < %s").format(
            sql.Identifier(model.column_name)
        ),
        (lo, hi),
    ).fetchone()
    return int(row[0]) if row else 0


def _next_batch(conn: Connection, model: EmbeddingModel, after_id: int, hi: int, limit: int) -> list[_Row]:
    rows = conn.execute(
        sql.SQL(
            "SELECT id, embed_hash, metadata ->> 'embed_header', content, token_count FROM chunks"
            " WHERE {} IS NULL AND id > %s AND id < %s ORDER BY id LIMIT %s"
        ).format(sql.Identifier(model.column_name)),
        (after_id, hi, limit),
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


async def _fill_batch(job: _FillJob, rows: Sequence[_Row]) -> int:
    unique = {row.embed_hash: EmbedItem(row.embed_hash, row.embed_text, row.token_count) for row in rows}
    found = await embed_missing(
        job.cache_conn, job.embedder, list(unique.values()), job.policy, job.budget, job.stats.embed
    )
    job.stats.cache_hits += found.hits
    ids = [row.id for row in rows]
    filled = _update_from_cache(job.conn, job.model, ids, job.settings.lock_timeout_seconds)
    job.stats.rows_filled += filled
    job.stats.batches += 1
    return filled


def _update_from_cache(conn: Connection, model: EmbeddingModel, ids: list[int], lock_timeout: float) -> int:
    """Write the batch under the load lock, so an ingest's swap and a batch never interleave."""
    column = sql.Identifier(model.column_name)
    try:
        with load_lock(conn, lock_timeout):
            return conn.execute(
                sql.SQL(
                    "UPDATE chunks c SET {column} = e.embedding::{type} FROM embedding_cache e"
                    " WHERE c.id = ANY(%s) AND c.{column} IS NULL AND e.model_key = %s"
                    " AND e.content_hash = c.embed_hash"
                ).format(column=column, type=model.column_type),
                (ids, model.model_key),
            ).rowcount
    except RunLocked:
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
    set_build_memory(
        conn, settings.maintenance_work_mem, settings.max_parallel_maintenance_workers, local=False
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
        raise ModelConfigError(f"model {slug} is retired; `ragingest backfill` brings it back")
    return model
