"""The two kinds of failure a stage can meet: worth another attempt, or not.

Prefect retries a stage only on a transient error; a terminal one fails it at
once with a message that says what to do. Exceptions carry their context as
fields (path, model key, batch, run key), and the message names it.
"""

from __future__ import annotations

import psycopg
from psycopg import errors

# Database errors that another attempt on a fresh connection can get past.
TRANSIENT_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.AdminShutdown,
    errors.CrashShutdown,
    errors.CannotConnectNow,
    # class 08, connection exception
    errors.ConnectionException,
    errors.ConnectionDoesNotExist,
    errors.ConnectionFailure,
    errors.SqlclientUnableToEstablishSqlconnection,
    errors.SqlserverRejectedEstablishmentOfSqlconnection,
    errors.TransactionResolutionUnknown,
)


class RagingestError(Exception):
    """Base of the project's errors, with the context that names what failed."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        model_key: str | None = None,
        batch: tuple[int, int] | None = None,
        run_key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.model_key, self.batch, self.run_key = path, model_key, batch, run_key


class TransientError(RagingestError):
    """Another attempt may succeed (a lost connection, a busy server)."""


class TerminalError(RagingestError):
    """Another attempt cannot succeed; the message says what to change."""


def is_transient(exc: BaseException) -> bool:
    """Classified by exception class, never by message text."""
    if isinstance(exc, (TransientError, *TRANSIENT_DATABASE_ERRORS)):
        return True
    # A connection lost mid-statement carries no SQLSTATE: the server never answered.
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
