"""Shared helpers of the benchmarks: a server, scratch databases, synthetic Markdown, timing.

Every benchmark runs from the repository root with one command
(`python bench/<name>.py`). The server is `DATABASE_URL` when set (the
benchmarks create and drop their own databases on it), else an embedded
Postgres in a temporary folder, removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
VENDORED_CORPORA = REPO / "tests" / "corpora"
"""The trimmed copies the repository carries (rust-book, docs-qa)."""


def corpus_path(name: str) -> Path:
    """A corpus folder: the full one in ../shared/corpora when present, else the repository's copy.

    Where neither exists the path returned does not either, and the script says it skipped it.
    """
    shared = SHARED / "corpora" / name
    return shared if shared.is_dir() or not (VENDORED_CORPORA / name).is_dir() else VENDORED_CORPORA / name


CORPORA = SHARED / "corpora" if (SHARED / "corpora").is_dir() else VENDORED_CORPORA
"""Where `CORPORA / name` looks: ../shared/corpora beside the checkout, else the repository's copies."""
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))


def _temporary_folder(prefix: str) -> Path:
    """A folder removed when the process exits (after anything registered later, such as the server)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# Prefect stays out of the way: no API logging, no analytics, a throwaway home.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = str(_temporary_folder("ragingest-bench-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from config.settings import Settings, load_settings  # noqa: E402
from tasks.db import apply_migrations  # noqa: E402

# --- the server and its databases ---------------------------------------------------


def server_url() -> str:
    """An admin URL we may create databases on: DATABASE_URL, else a private embedded server."""
    given = os.environ.get("DATABASE_URL")
    if given:
        return given
    from tasks.db import embedded_server_url

    return embedded_server_url(_temporary_folder("ragingest-bench-pg-"), delete_on_exit=True)


def database_url(admin_url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def create_database(admin_url: str, name: str, *, template: str | None = None, migrate: bool = True) -> str:
    """A fresh database (dropped first if it exists), migrated unless it is a template copy."""
    drop_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if template is None:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    url = database_url(admin_url, name)
    if migrate and template is None:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
    return url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def scratch_database(admin_url: str, name: str, *, template: str | None = None) -> Iterator[str]:
    url = create_database(admin_url, name, template=template)
    try:
        yield url
    finally:
        drop_database(admin_url, name)


def checkpoint(url: str) -> None:
    """Flush dirty pages, so one variant does not pay for the previous one's writes."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def bench_settings(url: str, dims: int = 384, **overrides: Any) -> Settings:
    """Hash provider (no model), the given database, everything else at its default."""
    values: dict[str, Any] = {
        "database_url": url,
        "embedding_provider": "hash",
        "embedding_model": "bench",
        "embedding_dimensions": dims,
    }
    values.update(overrides)
    return load_settings(**values)


def server_setting(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
    return str(row[0]) if row else "?"


# --- synthetic Markdown ----------------------------------------------------------------

_WORDS = (
    "pipeline vector index chunk embedding query table column schema model cache batch token"
    " postgres cluster replica backup restore latency throughput worker schedule deploy release"
    " config secret network storage volume service endpoint request response retry timeout"
    " budget search recall ranking document heading section page folder source nightly bulk"
).split()


def _sentence_pool(size: int = 512, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        words = rng.choices(_WORDS, k=rng.randint(8, 14))
        pool.append(" ".join(words).capitalize() + ".")
    return pool


SENTENCES = _sentence_pool()
SECTION_CHARS = 800
"""Characters of body text per section: one section is one chunk of about 180 tokens."""


def section_text(file_no: int, section_no: int, version: int = 0) -> str:
    """About 800 characters, unique per (file, section, version), built fast from a sentence pool."""
    parts = [f"Record {file_no}-{section_no}-v{version}."]
    length = len(parts[0])
    step = 1 + (file_no * 31 + section_no * 17 + version * 7) % 97
    index = file_no * 131 + section_no * 29 + version
    while length < SECTION_CHARS:
        sentence = SENTENCES[index % len(SENTENCES)]
        parts.append(sentence)
        length += len(sentence) + 1
        index += step
    return " ".join(parts)


def page_text(file_no: int, sections: int, version: int = 0) -> str:
    """Frontmatter, an H1 and `sections` H2 sections: `sections` chunks with the headings chunker."""
    lines = [
        "---",
        f"title: Page {file_no}",
        f"tags: [bench, group{file_no % 10}]",
        "---",
        f"# Page {file_no}",
        "",
    ]
    for section_no in range(sections):
        lines += [f"## Topic {section_no}", "", section_text(file_no, section_no, version), ""]
    return "\n".join(lines)


def page_path(file_no: int, files_per_folder: int = 100) -> str:
    area, group = file_no // (files_per_folder * 100), file_no // files_per_folder
    return f"area{area:02d}/group{group:04d}/page{file_no:06d}.md"


def write_tree(root: Path, files: int, sections: int, *, versions: Mapping[int, int] | None = None) -> Path:
    """`files` pages of `sections` sections each under `root`; `versions` maps file numbers to an edit."""
    versions = versions or {}
    for file_no in range(files):
        path = root / page_path(file_no)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page_text(file_no, sections, versions.get(file_no, 0)), encoding="utf-8")
    return root


def rewrite_files(root: Path, file_numbers: Sequence[int], sections: int, version: int) -> None:
    for file_no in file_numbers:
        (root / page_path(file_no)).write_text(page_text(file_no, sections, version), encoding="utf-8")


# --- pre-computed rows and the bare tables ------------------------------------------------

BENCH_SOURCE = "bench"
SECTIONS_PER_PAGE = 10


def parsed_pages(
    files: int, sections: int = SECTIONS_PER_PAGE, *, version: int = 0
) -> list[tuple[Any, list[Any]]]:
    """The documents and chunks the pipeline makes of `write_tree(root, files, sections)` (pure)."""
    from tasks.chunk import chunk_document
    from tasks.discover import parse_document

    docs = []
    for file_no in range(files):
        doc = parse_document(page_path(file_no), page_text(file_no, sections, version).encode())
        docs.append((doc, chunk_document(doc, chunker="headings", max_tokens=512, size=400, overlap=50)))
    return docs


@dataclass(slots=True)
class Rows:
    """Pre-computed rows: documents with their chunks, one vector per chunk, and the bare tuples."""

    docs: list[tuple[Any, list[Any]]]
    hashes: list[bytes]
    vectors: Any
    doc_rows: list[tuple[object, ...]]
    chunk_rows: list[tuple[object, ...]]

    @property
    def count(self) -> int:
        return len(self.hashes)

    def texts(self) -> list[str]:
        return [chunk.content for _, chunks in self.docs for chunk in chunks]

    def metadatas(self) -> list[dict[str, object]]:
        from tasks.staging import chunk_metadata

        return [chunk_metadata(doc, chunk) for doc, chunks in self.docs for chunk in chunks]


def make_rows(docs: list[tuple[Any, list[Any]]], vectors: Any) -> Rows:
    from psycopg.types.json import Jsonb

    from tasks.staging import chunk_metadata

    hashes = [chunk.embed_hash for _, chunks in docs for chunk in chunks]
    doc_rows: list[tuple[object, ...]] = []
    chunk_rows: list[tuple[object, ...]] = []
    for doc_id, (doc, chunks) in enumerate(docs, start=1):
        doc_rows.append(
            (
                doc_id,
                BENCH_SOURCE,
                doc.path,
                doc.namespace,
                doc.title,
                doc.description,
                list(doc.tags),
                list(doc.concept_keys),
                Jsonb(dict(doc.frontmatter)),
                doc.content_hash,
            )
        )
        for chunk in chunks:
            chunk_rows.append(
                (
                    doc_id,
                    chunk.ordinal,
                    list(chunk.heading_path),
                    chunk.content,
                    chunk.embed_hash,
                    chunk.token_count,
                    Jsonb(chunk_metadata(doc, chunk)),
                    vectors[len(chunk_rows)],
                )
            )
    return Rows(docs, hashes, vectors, doc_rows, chunk_rows)


def hash_vectors(docs: list[tuple[Any, list[Any]]], dims: int) -> Any:
    """The vectors the `hash` provider gives these chunks (what a warm cache holds)."""
    import numpy as np

    from tasks.embed import hash_vector

    return np.stack([hash_vector(chunk.embed_text, dims) for _, chunks in docs for chunk in chunks])


def random_vectors(count: int, dims: int, seed: int = 1) -> Any:
    import numpy as np

    vectors = np.random.default_rng(seed).standard_normal((count, dims), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def create_bare_tables(conn: Any, model: Any) -> None:
    """`bare_documents` and `bare_chunks`: the same columns, generated tsvector, keys and GIN
    index as `documents` and `chunks`, no HNSW index; plus `plain_chunks`, the chunk
    columns alone (no tsvector, no index)."""
    with conn.transaction():
        conn.execute("CREATE TABLE bare_documents (LIKE documents INCLUDING ALL)")
        conn.execute("ALTER TABLE bare_documents ALTER COLUMN id SET GENERATED BY DEFAULT")
        conn.execute("CREATE TABLE bare_chunks (LIKE chunks INCLUDING ALL EXCLUDING INDEXES)")
        conn.execute("ALTER TABLE bare_chunks ADD PRIMARY KEY (id), ADD UNIQUE (document_id, ordinal)")
        conn.execute(
            "ALTER TABLE bare_chunks ADD FOREIGN KEY (document_id)"
            " REFERENCES bare_documents (id) ON DELETE CASCADE"
        )
        conn.execute("CREATE INDEX bare_chunks_tsv_gin ON bare_chunks USING gin (tsv)")
        conn.execute(
            sql.SQL(
                "CREATE TABLE plain_chunks (document_id bigint NOT NULL, ordinal integer NOT NULL,"
                " heading_path text[] NOT NULL, content text NOT NULL, embed_hash bytea NOT NULL,"
                " token_count integer NOT NULL, metadata jsonb NOT NULL, {column} {type})"
            ).format(column=sql.Identifier(model.column_name), type=model.column_type)
        )


_DOC_COLUMNS = (
    "id, source, path, namespace, title, description, tags, concept_keys, frontmatter, content_hash"
)
_DOC_TYPES = ["int8", "text", "text", "text", "text", "text", "text[]", "text[]", "jsonb", "bytea"]


def chunk_columns(model: Any) -> sql.Composable:
    return sql.SQL(
        "document_id, ordinal, heading_path, content, embed_hash, token_count, metadata, {}"
    ).format(sql.Identifier(model.column_name))


def bare_copy(conn: Any, rows: Rows, model: Any, *, plain: bool = False) -> None:
    """One transaction: binary COPY of the documents, then of the chunks with their vectors."""
    with conn.transaction(), conn.cursor() as cur:
        if not plain:
            with cur.copy(f"COPY bare_documents ({_DOC_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_DOC_TYPES)
                for row in rows.doc_rows:
                    copy.write_row(row)
        table = sql.Identifier("plain_chunks" if plain else "bare_chunks")
        with cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table, chunk_columns(model))
        ) as copy:
            copy.set_types(["int8", "int4", "text[]", "text", "bytea", "int4", "jsonb", model.precision])
            for row in rows.chunk_rows:
                copy.write_row(row)


def bare_executemany(conn: Any, rows: Rows, model: Any, batch: int = 200) -> None:
    """One transaction: INSERTs of `batch` rows per executemany."""
    doc_insert = f"INSERT INTO bare_documents ({_DOC_COLUMNS}) VALUES ({', '.join(['%s'] * 10)})"
    chunk_insert = sql.SQL("INSERT INTO bare_chunks ({}) VALUES ({})").format(
        chunk_columns(model), sql.SQL(", ".join(["%s"] * 8))
    )
    with conn.transaction(), conn.cursor() as cur:
        for start in range(0, len(rows.doc_rows), batch):
            cur.executemany(doc_insert, rows.doc_rows[start : start + batch])
        for start in range(0, len(rows.chunk_rows), batch):
            cur.executemany(chunk_insert, rows.chunk_rows[start : start + batch])


def truncate(conn: Any, *tables: str) -> None:
    conn.execute(
        sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
            sql.SQL(", ").join(map(sql.Identifier, tables))
        )
    )


# --- timing ----------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@dataclass(slots=True)
class Samples:
    """Seconds of each repeat of one variant."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        if len(self.seconds) < 2:
            return ""
        return f"[{min(self.seconds):.2f}-{max(self.seconds):.2f}]"


def rotated(items: Sequence[Any], turn: int) -> list[Any]:
    """The variants in a different order each repeat, so none always runs first or last."""
    shift = turn % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                value.rjust(width) if i else value.ljust(width)
                for i, (value, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_ratios(ratios: Mapping[str, float | str]) -> None:
    """The closing line every benchmark prints."""
    parts = [
        f"{name}={value:.2f}" if isinstance(value, float) else f"{name}={value}"
        for name, value in ratios.items()
    ]
    print("RATIOS: " + " ".join(parts))
    sys.stdout.flush()


def note(message: str) -> None:
    print(message, flush=True)


def parse_int_list(text: str) -> list[int]:
    return [int(part.replace("_", "").replace("k", "000")) for part in text.split(",") if part.strip()]
