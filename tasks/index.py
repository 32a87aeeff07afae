"""Indexes of `chunks`: whether a load drops them (a pure plan), and building or dropping them.

A large load is faster with the indexes dropped and rebuilt once at the end; a
small delta keeps them online. The lexical GIN index and every model's HNSW
index follow the same plan, and they are always rebuilt inside the load's
transaction, so a failed load rolls the drop back too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg import sql

from config.settings import Settings
from tasks.db import Connection, index_validity
from tasks.pool import ConnectionSource
from tasks.registry import EmbeddingModel, create_hnsw_index, drop_hnsw_index

log = logging.getLogger(__name__)

GIN_INDEX = "chunks_tsv_gin"


@dataclass(frozen=True, slots=True)
class IndexPlan:
    strategy: str
    drop: bool
    reason: str


def choose_index_plan(
    strategy: str, *, rows_changed: int, table_rows: int, drop_fraction: float, drop_min_rows: int
) -> IndexPlan:
    """`auto` drops the indexes when the change is a large share of the table."""
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


def plan_for_change(
    conn: Connection, settings: Settings, source: str, rows_written: int, replaced_paths: Sequence[str]
) -> IndexPlan:
    """The plan for a load that writes `rows_written` chunks and replaces those of `replaced_paths`."""
    row = conn.execute(
        "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE d.source = %s AND d.path = ANY(%s)",
        (source, list(replaced_paths)),
    ).fetchone()
    replaced = int(row[0]) if row else 0
    return choose_index_plan(
        settings.index_strategy,
        rows_changed=rows_written + replaced,
        table_rows=count_chunks(conn),
        drop_fraction=settings.auto_drop_fraction,
        drop_min_rows=settings.auto_drop_min_rows,
    )


def count_chunks(conn: Connection) -> int:
    row = conn.execute("SELECT count(*) FROM chunks").fetchone()
    return int(row[0]) if row else 0


def drop_indexes(conn: Connection, models: Iterable[EmbeddingModel]) -> int:
    """Drop the lexical index and the models' HNSW indexes; returns how many HNSW were dropped."""
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(GIN_INDEX)))
    dropped = 0
    for model in models:
        drop_hnsw_index(conn, model)
        dropped += 1
    return dropped


def ensure_indexes(
    conn: Connection, models: Iterable[EmbeddingModel], maintenance_work_mem: str, workers: int
) -> int:
    """Build every missing or INVALID index, with the build's memory and workers (this transaction only).

    Returns how many HNSW indexes were built.
    """
    set_build_memory(conn, maintenance_work_mem, workers, local=True)
    present = index_validity(conn)
    if present.get(GIN_INDEX) is not True:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(GIN_INDEX)))
        conn.execute(sql.SQL("CREATE INDEX {} ON chunks USING gin (tsv)").format(sql.Identifier(GIN_INDEX)))
    built = 0
    for model in models:
        if present.get(model.index_name) is False:
            log.warning("index %s is INVALID; rebuilding it", model.index_name)
            drop_hnsw_index(conn, model)
        if present.get(model.index_name) is not True:
            create_hnsw_index(conn, model)
            built += 1
    return built


def set_build_memory(conn: Connection, maintenance_work_mem: str, workers: int, *, local: bool) -> None:
    """The memory and parallel workers of an index build: for this transaction, or the session
    (a CREATE INDEX CONCURRENTLY runs outside any transaction; reset them after it)."""
    scope = sql.SQL("SET LOCAL" if local else "SET")
    conn.execute(sql.SQL("{} maintenance_work_mem = {}").format(scope, sql.Literal(maintenance_work_mem)))
    conn.execute(sql.SQL("{} max_parallel_maintenance_workers = {}").format(scope, sql.Literal(workers)))


def vacuum_analyze(conn: Connection) -> float:
    """VACUUM cannot run inside a transaction: `conn` is in autocommit mode. Returns seconds."""
    started = time.perf_counter()
    conn.execute("VACUUM (ANALYZE) chunks, documents")
    return time.perf_counter() - started


def indexes_missing(connections: ConnectionSource, models: Iterable[EmbeddingModel]) -> bool:
    """Whether the lexical index or a ready model's HNSW index is missing or INVALID."""
    with connections.connection() as conn:
        present = index_validity(conn)
    wanted = [GIN_INDEX] + [m.index_name for m in models if m.status != "backfilling"]
    return not all(present.get(name) is True for name in wanted)


def vacuum(connections: ConnectionSource) -> float:
    """The vacuum stage: VACUUM ANALYZE on a connection of its own; returns seconds."""
    with connections.connection() as conn:
        return vacuum_analyze(conn)
