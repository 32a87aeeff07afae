"""Load rows/s: our load stage against a bare binary COPY and executemany, side by side.

The same pre-computed rows (documents, ~800-character chunks, vectors) go in
each way, into tables with the same columns, generated tsvector, keys, foreign
key and GIN index (no HNSW index anywhere: index builds are bench/bulk.py's).

- bare COPY: `COPY … (FORMAT BINARY)` of the documents, then of the chunks with
  their vectors, one transaction.
- bare COPY, no tsv/GIN: the chunks alone into a plain table without the
  generated tsvector and its GIN index (what lexical search costs every loader).
- executemany x200: INSERTs in batches of 200 rows, one transaction.
- ours, warm cache: what a run does once the vectors are in `embedding_cache`:
  binary COPY of the documents and chunk rows (no vectors) into the session's
  staging tables, in `prepare`'s steps, then `load_rows` (upsert documents,
  insert chunks joined with their cached vectors on the server), one transaction.
- ours, incl. cache write: the same, plus writing every vector to
  `embedding_cache` as the embed stage does (one committed binary COPY per
  embedding batch of `embed_batch_inputs` rows, so a crash never pays twice).

    python bench/load.py                      # 20k rows, 384 dims, 3 repeats
    python bench/load.py --rows 20000,100000 --dims 384,1536 --repeats 3
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from common import (
    BENCH_SOURCE,
    SECTIONS_PER_PAGE,
    Rows,
    Samples,
    bare_copy,
    bare_executemany,
    bench_settings,
    checkpoint,
    create_bare_tables,
    create_database,
    drop_database,
    make_rows,
    note,
    parse_int_list,
    parsed_pages,
    print_ratios,
    print_table,
    random_vectors,
    rotated,
    server_url,
    truncate,
)

from config.settings import Settings
from tasks.cache import write_vectors
from tasks.db import Connection, connect
from tasks.load import LoadRequest, LoadResult, load_rows
from tasks.registry import EmbeddingModel, ensure_ingest_model
from tasks.staging import StagingTarget, stage_documents


def prepare_database(admin: str, dims: int) -> tuple[str, Settings, EmbeddingModel]:
    url = create_database(admin, f"bench_load_{dims}")
    settings = bench_settings(url, dims)
    with connect(url) as conn:
        (model,) = ensure_ingest_model(conn, settings)
        create_bare_tables(conn, model)
    return url, settings, model


def write_cache(conn: Connection, rows: Rows, model: EmbeddingModel, batch: int) -> None:
    """As the embed stage does: one committed binary COPY per embedding batch."""
    for start in range(0, rows.count, batch):
        write_vectors(
            conn, model.model_key, rows.hashes[start : start + batch], rows.vectors[start : start + batch]
        )


def stage_and_load(conn: Connection, rows: Rows, model: EmbeddingModel, step_chunks: int) -> float:
    """Staging COPY in `prepare`'s steps, then the load transaction. Returns the staging seconds."""
    started = time.perf_counter()
    target = StagingTarget(uuid.uuid4(), 0, "bench", {})
    step: list[tuple[object, list[object]]] = []
    in_step = 0
    for doc, chunks in rows.docs:
        step.append((doc, chunks))
        in_step += len(chunks)
        if in_step >= step_chunks:
            stage_documents(conn, target, step)  # type: ignore[arg-type]
            step, in_step = [], 0
    if step:
        stage_documents(conn, target, step)  # type: ignore[arg-type]
    staged = time.perf_counter() - started
    result = LoadResult()
    with conn.transaction():
        load_rows(conn, LoadRequest(target.run_key, BENCH_SOURCE, [model], [], []), result)
    if result.chunks_written != rows.count:
        raise RuntimeError(f"loaded {result.chunks_written} of {rows.count} rows")
    return staged


@dataclass(slots=True)
class Variant:
    name: str
    setup: Callable[[], None]
    run: Callable[[], None]
    samples: Samples


class OurLoad:
    """Our two variants, sharing the cache state and the breakdown of their time."""

    def __init__(self, conn: Connection, rows: Rows, model: EmbeddingModel, settings: Settings) -> None:
        self.conn, self.rows, self.model, self.settings = conn, rows, model, settings
        self.cache_full = False
        self.parts = {name: Samples(name) for name in ("cache write", "staging COPY", "load transaction")}

    def setup(self, keep_cache: bool) -> None:
        truncate(self.conn, "documents")
        if not keep_cache:
            truncate(self.conn, "embedding_cache")
            self.cache_full = False
        elif not self.cache_full:
            write_cache(self.conn, self.rows, self.model, self.settings.embed_batch_inputs)
            self.cache_full = True

    def run(self, with_cache_write: bool) -> None:
        if with_cache_write:
            started = time.perf_counter()
            write_cache(self.conn, self.rows, self.model, self.settings.embed_batch_inputs)
            self.cache_full = True
            self.parts["cache write"].seconds.append(time.perf_counter() - started)
            stage_and_load(self.conn, self.rows, self.model, self.settings.stream_batch_chunks)
            return
        started = time.perf_counter()
        staged = stage_and_load(self.conn, self.rows, self.model, self.settings.stream_batch_chunks)
        self.parts["staging COPY"].seconds.append(staged)
        self.parts["load transaction"].seconds.append(time.perf_counter() - started - staged)


def measure(admin: str, count: int, dims: int, repeats: int) -> dict[str, float]:
    note(f"\n== {count:,} rows x {dims} dims")
    docs = parsed_pages(-(-count // SECTIONS_PER_PAGE))
    rows = make_rows(docs, random_vectors(sum(len(c) for _, c in docs), dims))
    assert rows.count == count == len(set(rows.hashes)), rows.count
    url, settings, model = prepare_database(admin, dims)
    conn = connect(url)
    ours = OurLoad(conn, rows, model, settings)
    variants = [
        Variant(
            "bare COPY",
            lambda: truncate(conn, "bare_documents"),
            lambda: bare_copy(conn, rows, model),
            Samples("bare COPY"),
        ),
        Variant(
            "bare COPY, no tsv/GIN",
            lambda: truncate(conn, "plain_chunks"),
            lambda: bare_copy(conn, rows, model, plain=True),
            Samples("plain"),
        ),
        Variant(
            "executemany x200",
            lambda: truncate(conn, "bare_documents"),
            lambda: bare_executemany(conn, rows, model),
            Samples("executemany"),
        ),
        Variant("ours, warm cache", lambda: ours.setup(True), lambda: ours.run(False), Samples("warm")),
        Variant(
            "ours, incl. cache write", lambda: ours.setup(False), lambda: ours.run(True), Samples("cold")
        ),
    ]
    for turn in range(repeats):
        for variant in rotated(variants, turn):
            variant.setup()
            checkpoint(url)
            started = time.perf_counter()
            variant.run()
            variant.samples.seconds.append(time.perf_counter() - started)
        note(
            f"   repeat {turn + 1}/{repeats}: "
            + ", ".join(f"{v.name} {v.samples.seconds[-1]:.2f}s" for v in variants)
        )
    conn.close()
    drop_database(admin, f"bench_load_{dims}")

    bare = variants[0].samples.median
    table: list[tuple[object, ...]] = [
        (v.name, v.samples.median, count / v.samples.median, bare / v.samples.median, v.samples.spread())
        for v in variants
    ]
    table += [
        (f"  of which {s.name}", s.median, count / s.median, "", s.spread()) for s in ours.parts.values()
    ]
    print_table(["variant", "median s", "rows/s", "x bare COPY", "range s"], table)
    size = f"{count // 1000}k/{dims}"
    return {
        f"ours_warm_vs_copy@{size}": bare / variants[3].samples.median,
        f"ours_with_cache_write_vs_copy@{size}": bare / variants[4].samples.median,
        f"executemany_vs_copy@{size}": bare / variants[2].samples.median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="20000", help="comma-separated row counts (default 20000)")
    parser.add_argument("--dims", default="384", help="comma-separated dimensions (default 384)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    admin = server_url()
    note(
        "Rows/s into equivalent tables (generated tsvector, keys, GIN; no HNSW), medians of repeats.\n"
        "ours, warm cache = staging COPY (no vectors) + one load transaction that joins the vectors in\n"
        "from embedding_cache; 'incl. cache write' adds the embed stage's committed per-batch cache COPY.\n"
        "x bare COPY = bare COPY seconds / variant seconds (higher is faster)."
    )
    ratios: dict[str, float] = {}
    for dims in parse_int_list(args.dims):
        for count in parse_int_list(args.rows):
            ratios.update(measure(admin, count, dims, args.repeats))
    print_ratios(ratios)


if __name__ == "__main__":
    main()
