"""A run's lifetime: the migrated database, its connection pool, and its registered run key."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from config.settings import Settings
from tasks.db import Connection, connect_migrated, database_url
from tasks.load import load_lock
from tasks.pool import open_pool
from tasks.registry import EmbeddingModel, ensure_ingest_model, find_model
from tasks.staging import registered_run


@dataclass(frozen=True, slots=True)
class Run:
    key: uuid.UUID
    """Keys this run's staging rows."""
    source: str
    pool: ConnectionPool[Connection]
    """Every stage borrows its connections here; a retried stage gets a fresh one."""


@contextmanager
def open_run(settings: Settings, source: str) -> Iterator[Run]:
    """Migrate, open the pool, and register the run; on the way out its staging is removed."""
    url = database_url(settings)
    with connect_migrated(url) as keeper, open_pool(url) as pool, registered_run(keeper, source) as key:
        yield Run(key, source, pool)


def ingest_models(run: Run, settings: Settings) -> list[EmbeddingModel]:
    """Every live model column the run fills (the configured model registered on a fresh database)."""
    with run.pool.connection() as conn:
        if find_model(
            conn, settings.embedding_provider, settings.embedding_model, settings.embedding_dimensions
        ):
            return ensure_ingest_model(conn, settings)
        with load_lock(conn, settings.lock_timeout_seconds):  # two first runs register it once
            return ensure_ingest_model(conn, settings)
