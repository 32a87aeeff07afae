"""Connection pools: one per run, and one per worker process for shards prepared elsewhere.

Every connection a pool hands out has the pgvector types registered and is in
autocommit mode, and is checked before it is handed out: a stage retried after
a dropped connection gets a fresh one instead of the dead one.
"""

from __future__ import annotations

import atexit
import threading
from contextlib import AbstractContextManager
from typing import Protocol

from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from config.settings import Settings
from tasks.db import Connection, database_url

_process_pools: dict[str, ConnectionPool[Connection]] = {}
_process_lock = threading.Lock()


class ConnectionSource(Protocol):
    """Anything that lends connections: a pool, or a test's stand-in."""

    def connection(self, timeout: float | None = None) -> AbstractContextManager[Connection]: ...


def open_pool(url: str, *, max_size: int = 4) -> ConnectionPool[Connection]:
    """An open pool of autocommit connections with pgvector registered; close it when done."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True},
        configure=register_vector,
        check=ConnectionPool.check_connection,
        open=True,
        name="ragingest",
    )


def process_pool(settings: Settings) -> ConnectionPool[Connection]:
    """The pool this process keeps for the configured database (a Dask worker prepares many shards)."""
    url = database_url(settings)
    with _process_lock:
        pool = _process_pools.get(url)
        if pool is None or pool.closed:
            pool = _process_pools[url] = open_pool(url)
        return pool


@atexit.register
def _close_process_pools() -> None:
    for pool in _process_pools.values():
        pool.close()
    _process_pools.clear()
