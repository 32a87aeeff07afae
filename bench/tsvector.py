"""Where the load computes `tsvector`: the generated column, or the load's own INSERT … SELECT.

The same chunk rows (about 800 characters of text, metadata with a title and
headings, 10 chunks per document) sit in an UNLOGGED staging table, as a run's
do before its load. Each variant inserts them all into an empty table with no
index (a bulk load builds its indexes after the rows), in one transaction:

- generated: `chunks`' own definition, `tsv` a STORED generated column;
- in the INSERT: a plain `tsv tsvector` column, filled by the same expression
  written into the INSERT … SELECT;
- no tsvector: the same columns without `tsv`, what computing it costs at all.

    python bench/tsvector.py                  # 20k rows, 5 repeats
    python bench/tsvector.py --rows 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import (
    SECTIONS_PER_PAGE,
    Samples,
    create_database,
    drop_database,
    make_rows,
    note,
    parsed_pages,
    print_ratios,
    print_table,
    random_vectors,
    rotated,
    server_url,
)

from tasks.db import open_connection

TSV = (
    "setweight(to_tsvector('english'::regconfig, coalesce(metadata ->> 'title', '')), 'A')"
    " || setweight(to_tsvector('english'::regconfig, coalesce(metadata ->> 'headings', '')), 'B')"
    " || setweight(to_tsvector('english'::regconfig, content), 'C')"
)
COLUMNS = (
    "document_id int8 NOT NULL, ordinal int4 NOT NULL, heading_path text[] NOT NULL,"
    " content text NOT NULL, metadata jsonb NOT NULL"
)
NAMES = "document_id, ordinal, heading_path, content, metadata"
TABLES = {
    "generated": f"CREATE TABLE target ({COLUMNS}, tsv tsvector GENERATED ALWAYS AS ({TSV}) STORED)",
    "in the INSERT": f"CREATE TABLE target ({COLUMNS}, tsv tsvector)",
    "no tsvector": f"CREATE TABLE target ({COLUMNS})",
}
INSERTS = {
    "generated": f"INSERT INTO target ({NAMES}) SELECT {NAMES} FROM stage",
    "in the INSERT": f"INSERT INTO target ({NAMES}, tsv) SELECT {NAMES}, {TSV} FROM stage",
    "no tsvector": f"INSERT INTO target ({NAMES}) SELECT {NAMES} FROM stage",
}


def stage_rows(conn: Any, rows: Any) -> None:
    conn.execute(f"CREATE UNLOGGED TABLE stage ({COLUMNS})")
    with conn.cursor() as cur, cur.copy(f"COPY stage ({NAMES}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int4", "text[]", "text", "jsonb"])
        for document_id, ordinal, heading_path, content, _, _, metadata, _ in rows.chunk_rows:
            copy.write_row((document_id, ordinal, heading_path, content, metadata))
    conn.execute("VACUUM ANALYZE stage")


def timed_insert(conn: Any, variant: str) -> float:
    conn.execute("DROP TABLE IF EXISTS target")
    conn.execute(TABLES[variant])
    conn.execute("CHECKPOINT")
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(INSERTS[variant])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    docs = parsed_pages(-(-args.rows // SECTIONS_PER_PAGE))
    rows = make_rows(docs, random_vectors(sum(len(c) for _, c in docs), 4))
    admin = server_url()
    url = create_database(admin, "bench_tsvector", migrate=False)
    samples = {name: Samples(name) for name in TABLES}
    try:
        with open_connection(url) as conn:  # no vector column here: no pgvector types
            stage_rows(conn, rows)
            note(f"{rows.count:,} chunk rows staged; medians of {args.repeats}")
            for turn in range(args.repeats):
                for name in rotated(list(samples), turn):
                    samples[name].seconds.append(timed_insert(conn, name))
                    note(f"   {name}: {samples[name].seconds[-1]:.2f}s")
    finally:
        drop_database(admin, "bench_tsvector")
    plain = samples["no tsvector"].median
    print_table(
        ["variant", "median s", "rows/s", "range s"],
        [(n, s.median, rows.count / s.median, s.spread()) for n, s in samples.items()],
    )
    print_ratios(
        {
            "generated_vs_in_insert": samples["generated"].median / samples["in the INSERT"].median,
            "tsvector_share_of_insert": (samples["generated"].median - plain) / samples["generated"].median,
        }
    )


if __name__ == "__main__":
    main()
