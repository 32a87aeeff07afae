"""Peak RSS of an ingest of a large synthetic corpus (hash provider), measured in a child process.

The parent writes a tree of `--chunks` chunks (10 sections of ~800 characters
per file), then runs `run_ingest` in a child process and reads the child's
peak RSS from `os.wait4` (the kernel's ru_maxrss for that process alone). The
child also reports its RSS right after its imports, so the ingest's own share
shows. The pipeline streams in steps of `stream_batch_chunks`, so the peak
should not grow with the corpus.

    python bench/memory.py                    # 100k chunks
    python bench/memory.py --chunks 1000000   # the full million (long: the server builds HNSW over 1M rows)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    SECTIONS_PER_PAGE,
    bench_settings,
    create_database,
    drop_database,
    note,
    print_ratios,
    print_table,
    server_url,
    write_tree,
)

GOAL_BYTES = 1.5 * 1024**3


def child(url: str, root: Path, dims: int) -> None:
    from flows.ingest import run_ingest

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    summary = run_ingest(bench_settings(url, dims), root)
    print(
        json.dumps(
            {
                "after_imports": after_imports,
                "seconds": time.perf_counter() - started,
                "chunks": summary["chunks"]["written"],
                "documents": summary["documents"]["new"],
                "stages": summary["seconds"],
            }
        )
    )


def measure(admin: str, work: Path, chunks: int, dims: int) -> tuple[int, dict[str, object]]:
    files = -(-chunks // SECTIONS_PER_PAGE)
    started = time.perf_counter()
    root = write_tree(work / f"tree{chunks}", files, SECTIONS_PER_PAGE)
    note(
        f"\n== {files:,} files / {files * SECTIONS_PER_PAGE:,} chunks written"
        f" in {time.perf_counter() - started:.0f}s;"
        " ingesting in a child process ..."
    )
    url = create_database(admin, "bench_memory")
    command = [sys.executable, __file__, "--child", url, str(root), "--dims", str(dims)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"the ingest child failed with status {status}")
    drop_database(admin, "bench_memory")
    shutil.rmtree(root)
    report = json.loads(output.strip().splitlines()[-1])
    return usage.ru_maxrss * 1024, report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--chunks", default="100000", help="comma-separated corpus sizes in chunks (default 100000)"
    )
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--child", nargs=2, metavar=("URL", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.dims)
        return
    admin = server_url()
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-memory-"))
    rows = []
    ratios: dict[str, float] = {}
    try:
        for chunks in (int(c) for c in args.chunks.split(",")):
            peak, report = measure(admin, work, chunks, args.dims)
            stages = report["stages"]
            assert isinstance(stages, dict)
            note(
                f"   {report['chunks']:,} chunks in {report['seconds']:.0f}s; stages: "
                + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
            )
            after, seconds = int(str(report["after_imports"])), float(str(report["seconds"]))
            rows.append((f"{chunks:,}", peak / 2**20, after / 2**20, (peak - after) / 2**20, seconds))
            ratios[f"peak_rss_gb@{chunks // 1000}k"] = peak / 2**30
            ratios[f"peak_vs_goal@{chunks // 1000}k"] = peak / GOAL_BYTES
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(["chunks", "peak RSS MiB", "after imports MiB", "ingest's share MiB", "ingest s"], rows)
    note("goal: peak RSS < 1.5 GB (peak_vs_goal < 1)")
    print_ratios(ratios)


if __name__ == "__main__":
    main()
