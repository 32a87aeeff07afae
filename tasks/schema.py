"""The schema the migrations make, compared with the live one, and repaired where that is safe.

The expected schema is never a hand-written list. Every migration in `sql/` is
applied to a scratch schema inside a transaction, and its catalog entries
(tables, columns, constraints, indexes) are compared with the live schema's, so
a new migration is covered the day it is added. A role that may not create a
schema gets the same comparison through temporary tables. Objects the database
holds beyond the migrations (a model's `emb_<slug>` column and HNSW index,
anything a user added) are not problems.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.db import MIGRATION_LOCK, MIGRATIONS_TABLE_DDL, SQL_DIR, Connection, read_migrations

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "ragingest_expected_"
LIKE_OPTIONS = sql.SQL(
    "INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY INCLUDING STORAGE"
    " INCLUDING COMPRESSION INCLUDING COMMENTS"
)
# Repair order: tables, columns, column settings, keys, other constraints, indexes.
RANK_TABLE, RANK_COLUMN, RANK_COLUMN_SETTING, RANK_KEY, RANK_CONSTRAINT, RANK_INDEX = range(6)


class SchemaCheckUnavailable(RuntimeError):
    """The migrations could not be applied to a scratch or temporary schema, so nothing was compared."""


class SchemaRepairFailed(RuntimeError):
    """A repair statement failed; the transaction was rolled back, so nothing changed."""

    def __init__(self, problem: str, cause: BaseException | str) -> None:
        super().__init__(f"could not repair {problem}: {cause} (nothing was changed)")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Column:
    type: str
    not_null: bool
    default: str | None
    """The default expression, or the generation expression of a generated column."""
    kind: str = ""
    """'' plain, 's' generated (stored), 'a' / 'd' identity (always / by default)."""


@dataclass(frozen=True, slots=True)
class Index:
    table: str
    definition: str
    valid: bool = True


@dataclass(frozen=True, slots=True)
class Catalog:
    """What one schema holds, every definition written without that schema's own name."""

    tables: Mapping[str, str]
    """Table name -> relpersistence ('p' permanent, 'u' unlogged, 't' temporary)."""
    columns: Mapping[tuple[str, str], Column]
    constraints: Mapping[tuple[str, str], tuple[str, str]]
    """(table, name) -> (contype, definition); NOT NULL lives in `columns`."""
    indexes: Mapping[str, Index]
    """Indexes that no primary-key, unique or exclusion constraint owns."""


@dataclass(frozen=True, slots=True)
class Expected:
    """The migrations' catalog and the schema it was built in (a scratch or the temporary one)."""

    catalog: Catalog
    scratch: str
    temporary: bool


@dataclass(frozen=True, slots=True)
class RepairStep:
    rank: int
    statement: sql.SQL | sql.Composed


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """One difference; `steps` re-create what is missing, or `refusal` says why it is left alone.

    A constraint or index of a missing table is not `shown` (the table is), but is still repaired.
    """

    message: str
    steps: tuple[RepairStep, ...] = ()
    refusal: str | None = None
    shown: bool = True

    @property
    def repairable(self) -> bool:
        return self.refusal is None and bool(self.steps)


@dataclass(frozen=True, slots=True)
class RepairReport:
    repaired: list[SchemaProblem]
    refused: list[SchemaProblem]


# --- reading a catalog ----------------------------------------------------------------------

_NAMESPACE = "(SELECT oid FROM pg_namespace WHERE nspname = %s)"
_TABLES = (
    "SELECT relname, relpersistence FROM pg_class"
    " WHERE relnamespace = " + _NAMESPACE + " AND relkind IN ('r', 'p')"
)
_COLUMNS = (
    "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
    " a.attidentity::text || a.attgenerated::text, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a"
    " JOIN pg_class c ON c.oid = a.attrelid"
    " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
    " WHERE c.relnamespace = " + _NAMESPACE + " AND c.relkind IN ('r', 'p')"
    " AND a.attnum > 0 AND NOT a.attisdropped"
)
_CONSTRAINTS = (
    "SELECT c.relname, co.conname, co.contype, pg_get_constraintdef(co.oid) FROM pg_constraint co"
    " JOIN pg_class c ON c.oid = co.conrelid WHERE c.relnamespace = " + _NAMESPACE + " AND co.contype <> 'n'"
)
_INDEXES = (
    "SELECT i.relname, t.relname, pg_get_indexdef(x.indexrelid), x.indisvalid FROM pg_index x"
    " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
    " WHERE t.relnamespace = " + _NAMESPACE + " AND NOT EXISTS (SELECT 1 FROM pg_constraint co"
    " WHERE co.conindid = x.indexrelid AND co.conrelid = x.indrelid AND co.contype IN ('p', 'u', 'x'))"
)


def read_catalog(conn: Connection, schema: str) -> Catalog:
    """Tables, columns, constraints and indexes of `schema`.

    Definitions are printed with an empty search_path (so every name is qualified alike),
    then this schema's own qualifier is taken out, so two schemas compare equal.
    """
    original = _search_path(conn)
    _set_search_path(conn, "")
    try:
        qualifier = _qualifier(conn, schema)
        tables = {str(name): str(kind) for name, kind in conn.execute(_TABLES, (schema,))}
        columns = {
            (str(t), str(c)): Column(str(typ), bool(not_null), _local(d, qualifier), str(kind))
            for t, c, typ, not_null, kind, d in conn.execute(_COLUMNS, (schema,))
        }
        constraints = {
            (str(t), str(name)): (str(kind), _local(str(text), qualifier) or "")
            for t, name, kind, text in conn.execute(_CONSTRAINTS, (schema,))
        }
        indexes = {
            str(name): Index(str(t), _local(str(text), qualifier) or "", bool(valid))
            for name, t, text, valid in conn.execute(_INDEXES, (schema,))
        }
    finally:
        _set_search_path(conn, original)
    return Catalog(tables, columns, constraints, indexes)


def _qualifier(conn: Connection, schema: str) -> str:
    row = conn.execute("SELECT quote_ident(%s) || '.'", (schema,)).fetchone()
    assert row is not None
    return str(row[0])


def _local(text: str | None, qualifier: str) -> str | None:
    """A definition without this schema's own qualifier (`ON public.chunks` -> `ON chunks`).

    Postgres prints the session's own temporary schema as `pg_temp`.
    """
    if text is None:
        return None
    names = re.escape(qualifier) + (r"|pg_temp\." if qualifier.startswith("pg_temp_") else "")
    return re.sub(rf"(\bON |\bREFERENCES |')(ONLY )?(?:{names})", r"\1\2", text)


def _search_path(conn: Connection) -> str:
    row = conn.execute("SELECT current_setting('search_path')").fetchone()
    assert row is not None
    return str(row[0])


def _set_search_path(conn: Connection, path: str) -> None:
    """For the rest of the current transaction only."""
    conn.execute("SELECT set_config('search_path', %s, true)", (path,))


def live_schema(conn: Connection) -> str:
    row = conn.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        raise SchemaCheckUnavailable("no schema on the search_path holds the tables (check search_path)")
    return str(row[0])


# --- the expected catalog -----------------------------------------------------------------------


def build_expected(conn: Connection, folder: Path = SQL_DIR) -> Expected:
    """Apply every migration to a new scratch schema (the temporary schema when the role may
    not create one) inside the caller's transaction, and read what they made."""
    original = _search_path(conn)
    scratch = f"{SCRATCH_PREFIX}{os.getpid()}"
    try:
        with conn.transaction():  # a savepoint: a refused CREATE SCHEMA keeps the transaction usable
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
            _apply_all(conn, folder, f"{_qualifier(conn, scratch)[:-1]}, {original}", temporary=False)
        _set_search_path(conn, original)
        return Expected(read_catalog(conn, scratch), scratch, temporary=False)
    except psycopg.errors.InsufficientPrivilege:
        log.info("no right to create a schema: comparing against temporary tables instead")
    try:
        with conn.transaction():
            _apply_all(conn, folder, f"pg_temp, {original}", temporary=True)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaCheckUnavailable(
            "cannot compare tables, columns, constraints and indexes: this role may neither create a"
            f" schema nor temporary tables ({exc.diag.message_primary}); run `ragingest db verify` as the"
            " schema's owner"
        ) from exc
    _set_search_path(conn, original)
    row = conn.execute("SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()").fetchone()
    assert row is not None
    return Expected(read_catalog(conn, str(row[0])), str(row[0]), temporary=True)


def _apply_all(conn: Connection, folder: Path, search_path: str, *, temporary: bool) -> None:
    _set_search_path(conn, search_path)
    conn.execute(MIGRATIONS_TABLE_DDL)
    for migration in read_migrations(folder):
        text = migration.text
        if temporary:  # a temporary table cannot be UNLOGGED; persistence is not compared
            text = re.sub(r"\bUNLOGGED\b", "", text, flags=re.IGNORECASE)
        try:
            conn.execute(text.encode())
        except psycopg.errors.InsufficientPrivilege:
            raise
        except psycopg.Error as exc:
            raise SchemaCheckUnavailable(
                f"migration {migration.name} does not apply to an empty scratch schema: {exc}"
            ) from exc


# --- comparing ----------------------------------------------------------------------------------


def compare(
    expected: Expected, actual: Catalog, *, schema: str, occupied: frozenset[str]
) -> list[SchemaProblem]:
    """Everything the migrations make that `actual` lacks or holds differently, with its repair.

    `occupied`: the tables holding rows (a NOT NULL column without a default cannot be added there).
    """
    want = expected.catalog
    problems = [_missing_table(expected, schema, t) for t in want.tables if t not in actual.tables]
    present = {table for table in want.tables if table in actual.tables}
    for (table, column), spec in want.columns.items():
        if table in present:
            have = actual.columns.get((table, column))
            problems += _column_problems(table, column, spec, have, occupied)
    for (table, name), (kind, text) in want.constraints.items():
        have_constraint = actual.constraints.get((table, name))
        problems += _constraint_problems(table, name, (kind, text), have_constraint, table in present)
    for name, index in want.indexes.items():
        problems += _index_problems(name, index, actual.indexes.get(name), index.table in present)
    return problems


def _missing_table(expected: Expected, schema: str, table: str) -> SchemaProblem:
    unlogged = expected.catalog.tables[table] == "u"
    statement = sql.SQL("CREATE {}TABLE {} (LIKE {} {})").format(
        sql.SQL("UNLOGGED " if unlogged else ""),
        sql.Identifier(schema, table),
        sql.Identifier(expected.scratch, table),
        LIKE_OPTIONS,
    )
    return SchemaProblem(f"table {table} is missing", (RepairStep(RANK_TABLE, statement),))


def _column_problems(
    table: str, column: str, want: Column, have: Column | None, occupied: frozenset[str]
) -> list[SchemaProblem]:
    name = f"column {table}.{column}"
    if have is None:
        if want.not_null and want.default is None and not want.kind and table in occupied:
            refusal = f"it is NOT NULL without a default and {table} holds rows: add it by hand with values"
            return [SchemaProblem(f"{name} is missing", refusal=refusal)]
        add = sql.SQL("ALTER TABLE {} ADD COLUMN {} ").format(sql.Identifier(table), sql.Identifier(column))
        return [SchemaProblem(f"{name} is missing", (RepairStep(RANK_COLUMN, add + _column_spec(want)),))]
    if _describe(have) != _describe(want) or (want.kind == "s" and have.default != want.default):
        refusal = f"change its type to {want.type} by hand, converting the values it holds"
        return [SchemaProblem(f"{name} is {_describe(have)}, expected {_describe(want)}", refusal=refusal)]
    alter = sql.SQL("ALTER TABLE {} ALTER COLUMN {} ").format(sql.Identifier(table), sql.Identifier(column))
    return _setting_problems(name, alter, want, have)


def _setting_problems(name: str, alter: sql.Composed, want: Column, have: Column) -> list[SchemaProblem]:
    problems = []
    if want.not_null and not have.not_null:
        step = RepairStep(RANK_COLUMN_SETTING, alter + sql.SQL("SET NOT NULL"))
        problems.append(SchemaProblem(f"{name} allows NULL, expected NOT NULL", (step,)))
    elif have.not_null and not want.not_null:
        step = RepairStep(RANK_COLUMN_SETTING, alter + sql.SQL("DROP NOT NULL"))
        problems.append(SchemaProblem(f"{name} is NOT NULL, expected to allow NULL", (step,)))
    if not want.kind and want.default != have.default:
        change = (
            sql.SQL("SET DEFAULT ") + catalog_sql(want.default) if want.default else sql.SQL("DROP DEFAULT")
        )
        message = f"{name} has default {have.default or '(none)'}, expected {want.default or '(none)'}"
        problems.append(SchemaProblem(message, (RepairStep(RANK_COLUMN_SETTING, alter + change),)))
    return problems


def _column_spec(want: Column) -> sql.Composed:
    spec = sql.Composed([catalog_sql(want.type)])
    if want.kind == "s":
        return (
            spec + sql.SQL(" GENERATED ALWAYS AS (") + catalog_sql(want.default or "") + sql.SQL(") STORED")
        )
    if want.kind in ("a", "d"):
        return spec + sql.SQL(
            " GENERATED ALWAYS AS IDENTITY" if want.kind == "a" else " GENERATED BY DEFAULT AS IDENTITY"
        )
    if want.default is not None:
        spec += sql.SQL(" DEFAULT ") + catalog_sql(want.default)
    return spec + sql.SQL(" NOT NULL" if want.not_null else "")


def catalog_sql(text: str) -> sql.SQL:
    """DDL text that Postgres printed (format_type, pg_get_expr, pg_get_constraintdef,
    pg_get_indexdef) for the objects our own migrations made in a scratch schema.

    The one place where SQL is built from text read at run time: it comes from the
    server's catalog of our migrations, never from a user, a file or a parameter.
    """
    return sql.SQL(text)


def _describe(column: Column) -> str:
    kinds = {"s": " (generated)", "a": " (identity)", "d": " (identity by default)"}
    return f"{column.type}{kinds.get(column.kind, '')}"


def _constraint_problems(
    table: str, name: str, want: tuple[str, str], have: tuple[str, str] | None, shown: bool
) -> list[SchemaProblem]:
    kind, text = want
    if have is None:
        rank = RANK_KEY if kind in ("p", "u") else RANK_CONSTRAINT
        add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(sql.Identifier(table), sql.Identifier(name))
        step = RepairStep(rank, add + catalog_sql(text))
        return [SchemaProblem(f"constraint {name} on {table} ({text}) is missing", (step,), shown=shown)]
    if have != want and shown:
        message = f"constraint {name} on {table} is ({have[1]}), expected ({text})"
        return [SchemaProblem(message, refusal="drop it, then run `ragingest db migrate --repair`")]
    return []


def _index_problems(name: str, want: Index, have: Index | None, shown: bool) -> list[SchemaProblem]:
    if have is None:
        step = RepairStep(RANK_INDEX, catalog_sql(want.definition))
        return [SchemaProblem(f"index {name} is missing", (step,), shown=shown)]
    if have.definition != want.definition:
        message = f"index {name} is ({have.definition}), expected ({want.definition})"
        return [SchemaProblem(message, refusal="drop it, then run `ragingest db migrate --repair`")]
    if not have.valid:
        step = RepairStep(RANK_INDEX, sql.SQL("REINDEX INDEX {}").format(sql.Identifier(name)))
        return [SchemaProblem(f"index {name} is INVALID (rebuild it)", (step,))]
    return []


# --- checking and repairing ---------------------------------------------------------------------


def occupied_tables(conn: Connection, schema: str, tables: Sequence[str]) -> frozenset[str]:
    """The tables, among `tables`, that hold at least one row."""
    occupied = set()
    for table in tables:
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, table))
        row = conn.execute(query).fetchone()
        if row is not None and row[0]:
            occupied.add(table)
    return frozenset(occupied)


def _problems(conn: Connection, expected: Expected, schema: str) -> list[SchemaProblem]:
    actual = read_catalog(conn, schema)
    present = [table for table in expected.catalog.tables if table in actual.tables]
    return compare(expected, actual, schema=schema, occupied=occupied_tables(conn, schema, present))


def find_schema_problems(conn: Connection, folder: Path = SQL_DIR) -> list[SchemaProblem]:
    """Compare the live schema with the migrations' (in a transaction rolled back: nothing changes)."""
    with conn.transaction(force_rollback=True):
        schema = live_schema(conn)
        return _problems(conn, build_expected(conn, folder), schema)


def repair_schema(conn: Connection, folder: Path = SQL_DIR) -> RepairReport:
    """Re-create whatever the migrations make that is missing, in one transaction (all or nothing).

    Differences it cannot repair safely (a wrong type, a changed definition, a NOT NULL
    column on a table with rows) are left alone and returned in `refused`.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        schema = live_schema(conn)
        expected = build_expected(conn, folder)
        problems = _problems(conn, expected, schema)
        _run_repairs(conn, schema, [p for p in problems if p.repairable])
        if not expected.temporary:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(expected.scratch)))
        left = [p for p in _problems(conn, expected, schema) if p.repairable]
        if left:
            raise SchemaRepairFailed(left[0].message, "still missing after the repair")
        rebuilt = rebuild_model_indexes(conn)
    return RepairReport(
        repaired=[p for p in problems if p.repairable and p.shown] + rebuilt,
        refused=[p for p in problems if p.refusal is not None],
    )


def rebuild_model_indexes(conn: Connection) -> list[SchemaProblem]:
    """Build the missing or INVALID HNSW index of each ready or active model whose column exists.

    A backfilling model's index is left to its backfill, which builds it when the column is full.
    """
    from tasks.db import index_validity
    from tasks.registry import chunk_columns, create_hnsw_index, drop_hnsw_index, list_models

    indexes, columns = index_validity(conn), set(chunk_columns(conn))
    rebuilt = []
    for model in list_models(conn):
        valid = indexes.get(model.index_name)
        if model.status not in ("ready", "active") or model.column_name not in columns or valid:
            continue
        if valid is False:
            drop_hnsw_index(conn, model)
        create_hnsw_index(conn, model)
        state = "is missing" if valid is None else "is INVALID (rebuild it)"
        rebuilt.append(SchemaProblem(f"index {model.index_name} of model {model.slug} {state}"))
    return rebuilt


def _run_repairs(conn: Connection, schema: str, problems: Sequence[SchemaProblem]) -> None:
    """Every step in rank order, names resolved in the live schema first."""
    _set_search_path(conn, f"{_qualifier(conn, schema)[:-1]}, {_search_path(conn)}")
    steps = sorted(((step, p) for p in problems for step in p.steps), key=lambda pair: pair[0].rank)
    for step, problem in steps:
        try:
            with conn.transaction():
                conn.execute(step.statement)
        except psycopg.Error as exc:
            raise SchemaRepairFailed(problem.message, exc) from exc
        log.info("repaired: %s", problem.message)
