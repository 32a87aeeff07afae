"""Bulk load end to end, the index strategies, and the HNSW build settings.

1. A bulk load from a warm embedding cache: `run_ingest` (hash provider,
   `index_strategy="drop"`) of a synthetic Markdown tree into an empty table:
   walk, chunk, cache lookups, staging COPY, load, HNSW rebuild, VACUUM ANALYZE.
   Against the floor: bare binary COPY of the same pre-computed rows into
   equivalent tables + CREATE INDEX (same m, ef_construction, memory and
   workers) + VACUUM ANALYZE. Plus the keep-index path (HNSW online during the
   load) on the same tree.
2. `auto` at 1%, 10% and 100% of the files changed in a table of
   `--auto-chunks` chunks (warm cache for both versions, so no embedding):
   each change is run with `keep` and with `drop`; the break-even is where the
   two times cross, given both as a share of changed chunks and as the share
   `auto` compares with `auto_drop_fraction` (rows written + deleted over the table).
3. The HNSW build over that table with `maintenance_work_mem` at the server
   default and as we set it, with 0 and with 2 parallel workers.

    python bench/bulk.py                                    # 20k chunks everywhere
    python bench/bulk.py --chunks 100000 --auto-chunks 100000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    BENCH_SOURCE,
    SECTIONS_PER_PAGE,
    Samples,
    bare_copy,
    bench_settings,
    checkpoint,
    create_bare_tables,
    create_database,
    drop_database,
    hash_vectors,
    make_rows,
    note,
    parsed_pages,
    print_ratios,
    print_table,
    rewrite_files,
    rotated,
    server_setting,
    server_url,
    write_tree,
)
from psycopg import sql

from config.settings import Settings
from flows.ingest import run_ingest
from tasks.cache import write_vectors
from tasks.db import connect
from tasks.index import choose_index_plan
from tasks.registry import create_hnsw_index, ensure_ingest_model, live_models

DIMS = 384


def ingest(url: str, root: Path, strategy: str, **overrides: Any) -> tuple[float, dict[str, Any]]:
    settings = bench_settings(url, DIMS, index_strategy=strategy, **overrides)
    started = time.perf_counter()
    summary = run_ingest(settings, root, source_name=BENCH_SOURCE)
    return time.perf_counter() - started, summary


def empty_template(admin: str, name: str, root: Path) -> None:
    """A database with a warm cache for `root`, no chunks, and the HNSW index on the empty table."""
    url = create_database(admin, name)
    ingest(url, root, "drop")
    with connect(url) as conn:
        conn.execute("TRUNCATE documents, ingest_runs RESTART IDENTITY CASCADE")
        for model in live_models(conn):
            create_hnsw_index(conn, model)
        conn.execute("VACUUM ANALYZE")


def hnsw_statement(settings: Settings, table: str, model: Any) -> sql.Composed:
    return sql.SQL(
        "CREATE INDEX ON {table} USING hnsw ({column} {opclass}) WITH (m = {m}, ef_construction = {ef})"
    ).format(
        table=sql.Identifier(table),
        column=sql.Identifier(model.column_name),
        opclass=model.opclass,
        m=sql.Literal(settings.hnsw_m),
        ef=sql.Literal(settings.hnsw_ef_construction),
    )


def floor_load(url: str, rows: Any, settings: Settings) -> float:
    """Bare COPY + CREATE INDEX (our memory and workers) + VACUUM ANALYZE."""
    with connect(url) as conn:
        (model,) = live_models(conn)
        started = time.perf_counter()
        bare_copy(conn, rows, model)
        with conn.transaction():
            conn.execute(
                sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
                    sql.Literal(settings.maintenance_work_mem)
                )
            )
            conn.execute(
                sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
                    sql.Literal(settings.max_parallel_maintenance_workers)
                )
            )
            conn.execute(hnsw_statement(settings, "bare_chunks", model))
        conn.execute("VACUUM (ANALYZE) bare_chunks, bare_documents")
        return time.perf_counter() - started


# --- 1. bulk load against the floor -----------------------------------------------------


def bulk_vs_floor(admin: str, work: Path, chunks: int, repeats: int, keep_repeats: int) -> dict[str, float]:
    files = -(-chunks // SECTIONS_PER_PAGE)
    note(
        f"\n== 1. bulk load of {files:,} files / {files * SECTIONS_PER_PAGE:,} chunks x {DIMS} dims,"
        " warm cache"
    )
    root = write_tree(work / "bulk", files, SECTIONS_PER_PAGE)
    template = "bench_bulk_template"
    empty_template(admin, template, root)
    docs = parsed_pages(files)
    rows = make_rows(docs, hash_vectors(docs, DIMS))
    settings = bench_settings("", DIMS)
    samples = {name: Samples(name) for name in ("floor", "drop", "keep")}
    stages: dict[str, list[dict[str, float]]] = {"drop": [], "keep": []}

    def run(name: str) -> None:
        url = create_database(admin, "bench_bulk_run", template=template)
        if name == "floor":
            with connect(url) as conn:
                create_bare_tables(conn, live_models(conn)[0])
        checkpoint(url)
        if name == "floor":
            seconds = floor_load(url, rows, settings)
        else:
            seconds, summary = ingest(url, root, name)
            assert summary["chunks"]["written"] == rows.count and summary["embeddings"]["embedded"] == 0, (
                summary
            )
            stages[name].append(summary["seconds"])
        samples[name].seconds.append(seconds)
        drop_database(admin, "bench_bulk_run")
        note(f"   {name}: {seconds:.2f}s")

    for turn in range(max(repeats, keep_repeats)):
        names = ["floor", "drop"] if turn < repeats else []
        names += ["keep"] if turn < keep_repeats else []
        for name in rotated(names, turn):
            run(name)
    drop_database(admin, template)
    shutil.rmtree(root)

    floor = samples["floor"].median
    table = [
        ("floor: bare COPY + CREATE INDEX + VACUUM ANALYZE", floor, 1.0, samples["floor"].spread()),
        (
            "ours, index_strategy=drop",
            samples["drop"].median,
            samples["drop"].median / floor,
            samples["drop"].spread(),
        ),
        (
            "ours, index_strategy=keep",
            samples["keep"].median,
            samples["keep"].median / floor,
            samples["keep"].spread(),
        ),
    ]
    print_table(["bulk load", "median s", "x floor", "range s"], table)
    for name in ("drop", "keep"):
        last = stages[name][-1]
        note(f"   ours ({name}), last run's stages: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()))
    size = f"{rows.count // 1000}k"
    return {
        f"drop_vs_floor@{size}": samples["drop"].median / floor,
        f"keep_vs_floor@{size}": samples["keep"].median / floor,
    }


# --- 2. auto: drop against keep at several shares of change ---------------------------------


def auto_template(admin: str, root: Path, files: int) -> str:
    """A table of the tree's version 0, indexed, and a cache warm for versions 0 and 1."""
    template = "bench_auto_template"
    url = create_database(admin, template)
    ingest(url, root, "drop")
    changed = parsed_pages(files, version=1)
    vectors = hash_vectors(changed, DIMS)
    hashes = [chunk.embed_hash for _, chunks in changed for chunk in chunks]
    settings = bench_settings(url, DIMS)
    with connect(url) as conn:
        key = ensure_ingest_model(conn, settings)[0].model_key
        for start in range(0, len(hashes), 2048):
            write_vectors(conn, key, hashes[start : start + 2048], vectors[start : start + 2048])
        conn.execute("VACUUM ANALYZE")
    return template


def auto_choices(admin: str, work: Path, chunks: int, fractions: Sequence[float]) -> dict[str, float | str]:
    files = -(-chunks // SECTIONS_PER_PAGE)
    note(f"\n== 2. keep vs drop after changing a share of a {files * SECTIONS_PER_PAGE:,}-chunk table")
    root = write_tree(work / "auto", files, SECTIONS_PER_PAGE)
    template = auto_template(admin, root, files)
    defaults = bench_settings("", DIMS)
    rows: list[tuple[Any, ...]] = []
    points: list[tuple[float, float, float, float]] = []
    changed_now = 0
    for fraction in fractions:
        count = max(1, round(files * fraction))
        rewrite_files(root, range(changed_now, count), SECTIONS_PER_PAGE, version=1)
        rewrite_files(root, range(count, changed_now), SECTIONS_PER_PAGE, version=0)
        changed_now = count
        seconds: dict[str, float] = {}
        for strategy in rotated(["keep", "drop"], len(points)):
            url = create_database(admin, "bench_auto_run", template=template)
            checkpoint(url)
            seconds[strategy], summary = ingest(url, root, strategy)
            drop_database(admin, "bench_auto_run")
            assert summary["embeddings"]["embedded"] == 0, summary["embeddings"]
            note(f"   {fraction:.0%} changed, {strategy}: {seconds[strategy]:.2f}s")
        written, deleted, total = (
            summary["chunks"]["written"],
            summary["chunks"]["deleted"],
            summary["chunks"]["total"],
        )
        table_rows = total - written + deleted
        auto = choose_index_plan(
            "auto",
            rows_changed=written + deleted,
            table_rows=table_rows,
            drop_fraction=defaults.auto_drop_fraction,
            drop_min_rows=defaults.auto_drop_min_rows,
        )
        faster = "drop" if seconds["drop"] < seconds["keep"] else "keep"
        picked = "drop" if auto.drop else "keep"
        share = (written + deleted) / table_rows
        points.append((written / table_rows, share, seconds["keep"], seconds["drop"]))
        rows.append(
            (
                f"{fraction:.0%}",
                f"{written:,}",
                f"{share:.1%}",
                seconds["keep"],
                seconds["drop"],
                faster,
                picked,
                "yes" if faster == picked else "NO",
            )
        )
    drop_database(admin, template)
    shutil.rmtree(root)
    print_table(
        [
            "files changed",
            "chunks changed",
            "auto's share",
            "keep s",
            "drop s",
            "faster",
            "auto picks",
            "right?",
        ],
        rows,
    )
    changed_share, auto_share = break_even(points)
    note(
        f"   break-even: {describe(changed_share)} of the chunks changed = auto's share "
        f"(written+deleted)/table of {describe(auto_share)}; default auto_drop_fraction "
        f"{defaults.auto_drop_fraction:.2f} (auto_drop_min_rows {defaults.auto_drop_min_rows})"
    )
    result: dict[str, float | str] = {
        f"auto_right@{int(f * 100)}%": str(row[-1] == "yes").lower()
        for f, row in zip(fractions, rows, strict=True)
    }
    result["break_even_auto_share"] = auto_share if auto_share is not None else "n/a"
    return result


def break_even(points: Sequence[tuple[float, float, float, float]]) -> tuple[float | None, float | None]:
    """Where keep stops being faster, interpolated linearly between two measured shares."""
    ordered = sorted(points)
    for (c0, a0, k0, d0), (c1, a1, k1, d1) in zip(ordered, ordered[1:], strict=False):
        gap0, gap1 = k0 - d0, k1 - d1
        if gap0 <= 0 < gap1 or gap0 >= 0 > gap1:
            t = gap0 / (gap0 - gap1)
            return c0 + t * (c1 - c0), a0 + t * (a1 - a0)
    return None, None


def describe(share: float | None) -> str:
    return "n/a (no crossing between the measured shares)" if share is None else f"{share:.1%}"


# --- 3. HNSW build settings ----------------------------------------------------------------------


def hnsw_settings(admin: str, work: Path, chunks: int) -> dict[str, float]:
    files = -(-chunks // SECTIONS_PER_PAGE)
    note(f"\n== 3. HNSW build over {files * SECTIONS_PER_PAGE:,} x {DIMS} (m=16, ef_construction=64)")
    root = write_tree(work / "hnsw", files, SECTIONS_PER_PAGE)
    url = create_database(admin, "bench_hnsw")
    ingest(url, root, "drop")
    shutil.rmtree(root)
    ours = bench_settings(url, DIMS)
    default_mem = server_setting(url, "maintenance_work_mem")
    cases = [
        (default_mem, 2),
        (ours.maintenance_work_mem, 2),
        (ours.maintenance_work_mem, 0),
        (default_mem, 0),
    ]
    rows = []
    seconds: dict[tuple[str, int], float] = {}
    with connect(url) as conn:
        (model,) = live_models(conn)
        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        for memory, workers in cases:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(model.index_name)))
            checkpoint(url)
            notices.clear()
            started = time.perf_counter()
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(memory)))
                conn.execute(
                    sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(workers))
                )
                create_hnsw_index(conn, model)
            seconds[(memory, workers)] = time.perf_counter() - started
            spilled = any("no longer fits" in n for n in notices)
            rows.append((memory, workers, seconds[(memory, workers)], "yes" if spilled else "no"))
            note(f"   maintenance_work_mem={memory} workers={workers}: {seconds[(memory, workers)]:.2f}s")
    drop_database(admin, "bench_hnsw")
    print_table(["maintenance_work_mem", "workers", "build s", "graph outgrew memory"], rows)
    ours_case = seconds[(ours.maintenance_work_mem, 2)]
    return {
        "hnsw_default_mem_vs_ours": seconds[(default_mem, 2)] / ours_case,
        "hnsw_0_workers_vs_2": seconds[(ours.maintenance_work_mem, 0)] / ours_case,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=20_000, help="chunks of the bulk load (default 20000)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the floor and the drop path")
    parser.add_argument("--keep-repeats", type=int, default=1, help="repeats of the (slow) keep path")
    parser.add_argument(
        "--auto-chunks", type=int, default=20_000, help="table size for the auto part (default 20000)"
    )
    parser.add_argument(
        "--fractions", default="0.01,0.1,1.0", help="shares of files changed (default 0.01,0.1,1.0)"
    )
    parser.add_argument(
        "--hnsw-chunks",
        type=int,
        default=None,
        help="table size for the build settings (default: --auto-chunks)",
    )
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    admin = server_url()
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-bulk-"))
    note(
        f"server maintenance_work_mem={server_setting(admin, 'maintenance_work_mem')}, "
        f"max_parallel_maintenance_workers={server_setting(admin, 'max_parallel_maintenance_workers')}; "
        "ours sets maintenance_work_mem=1GB, workers=2 for the build. Times are medians of repeats."
    )
    ratios: dict[str, float | str] = {}
    try:
        if 1 in parts:
            ratios.update(bulk_vs_floor(admin, work, args.chunks, args.repeats, args.keep_repeats))
        if 2 in parts:
            fractions = [float(f) for f in args.fractions.split(",")]
            ratios.update(auto_choices(admin, work, args.auto_chunks, fractions))
        if 3 in parts:
            ratios.update(hnsw_settings(admin, work, args.hnsw_chunks or args.auto_chunks))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_ratios(ratios)


if __name__ == "__main__":
    main()
