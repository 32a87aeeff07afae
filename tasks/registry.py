"""The embedding-model registry: one `emb_<slug>` column and HNSW index per model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from psycopg import sql
from psycopg.rows import class_row

from config.settings import Settings, model_key
from tasks.db import Connection

Precision = Literal["vector", "halfvec"]
ModelStatus = Literal["backfilling", "ready", "active", "retired"]

SLUG_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,43}$")
HNSW_MAX_VECTOR_DIMS = 2000  # pgvector's HNSW limit for `vector`
HNSW_MAX_HALFVEC_DIMS = 4000  # …and for `halfvec`
REGISTRY_LOCK = 7_406_003  # advisory lock key held by a registration until its transaction ends


class InvalidIdentifier(ValueError):
    """A slug or column name that could reach SQL and does not match the allowed pattern."""


class ModelConfigError(ValueError):
    """The configured model cannot be used as asked; the message says what to do."""


@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    slug: str
    provider: str
    model: str
    dimensions: int
    column_name: str
    precision: str
    hnsw_m: int
    hnsw_ef_construction: int
    status: str

    @property
    def model_key(self) -> str:
        return model_key(self.provider, self.model, self.dimensions)

    @property
    def index_name(self) -> str:
        return hnsw_index_name(self.column_name)

    @property
    def column_type(self) -> sql.Composable:
        return sql.SQL("{}({})").format(_PRECISION_TYPES[self.precision], sql.Literal(self.dimensions))

    @property
    def opclass(self) -> sql.Composable:
        return _COSINE_OPCLASSES[self.precision]


# Only these constant texts ever reach SQL for a precision; anything else is a KeyError.
_PRECISION_TYPES = {"vector": sql.SQL("vector"), "halfvec": sql.SQL("halfvec")}
_COSINE_OPCLASSES = {"vector": sql.SQL("vector_cosine_ops"), "halfvec": sql.SQL("halfvec_cosine_ops")}


def validate_slug(slug: str) -> str:
    if not SLUG_PATTERN.fullmatch(slug):
        raise InvalidIdentifier(
            f"invalid model slug {slug!r}: use 1-44 characters, a-z, 0-9 and _, starting with a letter"
        )
    return slug


def slug_for(model: str, dimensions: int) -> str:
    """A readable slug: `all_minilm_l6_v2_384`, `text_embedding_3_small_1536`."""
    base = re.sub(r"[^a-z0-9]+", "_", model.lower().rsplit("/", 1)[-1]).strip("_") or "model"
    if not base[0].isalpha():
        base = f"m_{base}"
    suffix = f"_{dimensions}"
    return validate_slug(base[: 44 - len(suffix)].rstrip("_") + suffix)


def hnsw_index_name(column_name: str) -> str:
    return f"chunks_{column_name}_hnsw"


def choose_precision(dimensions: int, requested: Precision | None = None) -> Precision:
    """`vector` up to 2,000 dimensions; `halfvec` above, because HNSW needs it there."""
    if requested is not None and requested not in _PRECISION_TYPES:
        raise ModelConfigError(f"unknown precision {requested!r}: use vector or halfvec")
    if dimensions < 1:
        raise ModelConfigError(f"{dimensions} dimensions: a model has at least 1")
    if dimensions > HNSW_MAX_HALFVEC_DIMS:
        raise ModelConfigError(
            f"{dimensions} dimensions is over the {HNSW_MAX_HALFVEC_DIMS} "
            "that an HNSW index on halfvec allows"
        )
    if requested == "vector" and dimensions > HNSW_MAX_VECTOR_DIMS:
        raise ModelConfigError(
            f"HNSW indexes `vector` columns up to {HNSW_MAX_VECTOR_DIMS} dimensions; "
            f"use --precision halfvec for {dimensions} dimensions"
        )
    if requested is not None:
        return requested
    return "halfvec" if dimensions > HNSW_MAX_VECTOR_DIMS else "vector"


_SELECT = (
    "SELECT slug, provider, model, dimensions, column_name, precision, hnsw_m,"
    " hnsw_ef_construction, status FROM embedding_models"
)


def list_models(conn: Connection) -> list[EmbeddingModel]:
    with conn.cursor(row_factory=class_row(EmbeddingModel)) as cur:
        return cur.execute(_SELECT + " ORDER BY created_at, slug").fetchall()


def live_models(conn: Connection) -> list[EmbeddingModel]:
    """Every model whose column ingests must fill: all but the retired ones."""
    return [m for m in list_models(conn) if m.status != "retired"]


def get_model(conn: Connection, slug: str) -> EmbeddingModel | None:
    with conn.cursor(row_factory=class_row(EmbeddingModel)) as cur:
        return cur.execute(_SELECT + " WHERE slug = %s", (validate_slug(slug),)).fetchone()


def find_model(conn: Connection, provider: str, model: str, dimensions: int) -> EmbeddingModel | None:
    with conn.cursor(row_factory=class_row(EmbeddingModel)) as cur:
        return cur.execute(
            _SELECT + " WHERE provider = %s AND model = %s AND dimensions = %s",
            (provider, model, dimensions),
        ).fetchone()


def register_model(
    conn: Connection,
    *,
    provider: str,
    model: str,
    dimensions: int,
    status: ModelStatus,
    precision: Precision | None = None,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    slug: str | None = None,
) -> EmbeddingModel:
    """Add the model and its column (idempotent); a retired one is registered afresh.

    A live model whose column has gone missing gets it back, empty. The caller
    owns the transaction; registrations queue behind each other until it ends, so
    two of them never choose the same slug.
    """
    chosen = choose_precision(dimensions, precision)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))  # one registration at a time
    existing = find_model(conn, provider, model, dimensions)
    if existing is not None and existing.status == "retired":
        return _register_again(conn, existing, status, chosen, hnsw_m, hnsw_ef_construction)
    if existing is not None:
        if column_type(conn, existing.column_name) is None:
            _add_column(conn, existing)
        return existing
    slug = validate_slug(slug) if slug is not None else free_slug(conn, model, dimensions)
    conn.execute(
        "INSERT INTO embedding_models (slug, provider, model, dimensions, column_name, precision,"
        " hnsw_m, hnsw_ef_construction, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (slug, provider, model, dimensions, f"emb_{slug}", chosen, hnsw_m, hnsw_ef_construction, status),
    )
    registered = get_model(conn, slug)
    assert registered is not None
    _add_column(conn, registered)
    return registered


def _register_again(
    conn: Connection, retired: EmbeddingModel, status: ModelStatus, precision: Precision, m: int, ef: int
) -> EmbeddingModel:
    """A retired model back under its own slug, with a new, empty column (a leftover one is dropped)."""
    drop_hnsw_index(conn, retired)
    conn.execute(
        sql.SQL("ALTER TABLE chunks DROP COLUMN IF EXISTS {}").format(sql.Identifier(retired.column_name))
    )
    conn.execute(
        "UPDATE embedding_models SET status = %s, precision = %s, hnsw_m = %s, hnsw_ef_construction = %s,"
        " updated_at = now() WHERE slug = %s",
        (status, precision, m, ef, retired.slug),
    )
    registered = get_model(conn, retired.slug)
    assert registered is not None
    _add_column(conn, registered)
    return registered


def _add_column(conn: Connection, model: EmbeddingModel) -> None:
    conn.execute(
        sql.SQL("ALTER TABLE chunks ADD COLUMN IF NOT EXISTS {} {}").format(
            sql.Identifier(model.column_name), model.column_type
        )
    )


def free_slug(conn: Connection, model: str, dimensions: int) -> str:
    """`slug_for(model, dimensions)`, or with `_2`, `_3`… when another model or a stray column has it.

    Two names can make one slug (`Org/Model` and `model`), and a column left
    without a registry row holds vectors nobody vouches for: neither is reused.
    """
    base = slug_for(model, dimensions)
    taken = {row[0] for row in conn.execute("SELECT slug FROM embedding_models")}
    taken |= {name.removeprefix("emb_") for name in chunk_columns(conn) if name.startswith("emb_")}
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        suffix = f"_{n}"
        candidate = validate_slug(base[: 44 - len(suffix)].rstrip("_") + suffix)
    return candidate


def chunk_columns(conn: Connection) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'chunks'::regclass AND attnum > 0"
        " AND NOT attisdropped"
    ).fetchall()
    return [str(row[0]) for row in rows]


def column_type(conn: Connection, column_name: str) -> str | None:
    """The column's SQL type as Postgres prints it (`vector(384)`), or None when it does not exist."""
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'chunks'::regclass"
        " AND attname = %s AND attnum > 0 AND NOT attisdropped",
        (column_name,),
    ).fetchone()
    return None if row is None else str(row[0])


def check_column(conn: Connection, model: EmbeddingModel) -> None:
    """Refuse a model whose column holds another type than the registry says (a missing one is fine)."""
    found = column_type(conn, model.column_name)
    expected = f"{model.precision}({model.dimensions})"
    if found is not None and found != expected:
        raise ModelConfigError(
            f"column chunks.{model.column_name} is {found}, but the registry says {model.slug} is "
            f"{expected}; retire {model.slug} and backfill it again"
        )


def ensure_ingest_model(conn: Connection, settings: Settings) -> list[EmbeddingModel]:
    """Register the configured model on a fresh database; return every live model.

    On a database that already holds chunks, a model that is not registered is
    refused: adding it is a backfill, which fills the column for every chunk.
    """
    configured = find_model(
        conn, settings.embedding_provider, settings.embedding_model, settings.embedding_dimensions
    )
    if configured is not None and configured.status == "retired":
        raise ModelConfigError(
            f"model {configured.slug} ({configured.model_key}) is retired; configure a live model "
            f"(see `ragingest models list`), or bring it back with `ragingest backfill --provider "
            f"{configured.provider} --model {configured.model} --dimensions {configured.dimensions}`"
        )
    if configured is None:
        live = live_models(conn)
        has_chunks = conn.execute("SELECT EXISTS (SELECT 1 FROM chunks)").fetchone()
        if live and has_chunks is not None and has_chunks[0]:
            names = ", ".join(f"{m.slug} ({m.model_key}, {m.status})" for m in live)
            raise ModelConfigError(
                f"the configured model {settings.model_key} is not registered in this database, "
                f"which holds chunks embedded with {names}. Add it with `ragingest backfill "
                f"--provider {settings.embedding_provider} --model {settings.embedding_model} "
                f"--dimensions {settings.embedding_dimensions}`, or configure a registered model."
            )
        has_active = any(m.status == "active" for m in live)
        with conn.transaction():
            register_model(
                conn,
                provider=settings.embedding_provider,
                model=settings.embedding_model,
                dimensions=settings.embedding_dimensions,
                status="ready" if has_active else "active",
                hnsw_m=settings.hnsw_m,
                hnsw_ef_construction=settings.hnsw_ef_construction,
            )
    return live_models(conn)


def create_hnsw_index(conn: Connection, model: EmbeddingModel, *, concurrently: bool = False) -> None:
    conn.execute(
        sql.SQL(
            "CREATE INDEX {concurrently} IF NOT EXISTS {name} ON chunks USING hnsw ({column} {opclass})"
            " WITH (m = {m}, ef_construction = {ef})"
        ).format(
            concurrently=sql.SQL("CONCURRENTLY" if concurrently else ""),
            name=sql.Identifier(model.index_name),
            column=sql.Identifier(model.column_name),
            opclass=model.opclass,
            m=sql.Literal(model.hnsw_m),
            ef=sql.Literal(model.hnsw_ef_construction),
        )
    )


def drop_hnsw_index(conn: Connection, model: EmbeddingModel) -> None:
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(model.index_name)))
