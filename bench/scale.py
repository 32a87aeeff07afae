"""Scaling out: chunks prepared per second in-process, on 1 Dask worker and on 2, side by side.

Each variant runs `run_ingest` into a fresh database (so nothing is a cache hit)
and times only the prepare phase (read, chunk, look up, embed, stage: the work a
cluster takes over), not the load. The Dask variants use local clusters started
once (one process per worker, one thread each) and warmed up first, so worker
start-up, imports and the model load are not counted, as on a cluster that is
already running. Two workloads:

- hash: the hash provider over a corpus (chunk-bound);
- local: the local all-MiniLM-L6-v2 model over a few hundred chunks (embed-bound).

Coordination overhead per shard is the time the workers were not inside a shard:
(prepare wall x workers - sum of the shards' own seconds) / shards.

    python bench/scale.py                                  # prefect-docs (hash) + rust-book pages (local)
    python bench/scale.py --corpus rust-book --local-bytes 300000 --repeats 1
    python bench/scale.py --skip-local
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    CORPORA,
    bench_settings,
    create_database,
    drop_database,
    note,
    print_ratios,
    print_table,
    rotated,
    server_url,
)

from flows.ingest import prepare_stage, run_ingest, shards_in_order
from tasks.runners import process_embedder, shard_runner_for

TEMPLATE = "ragingest_bench_scale_template"


@dataclass(slots=True)
class Measure:
    chunks: int
    seconds: float
    shard_seconds: list[float]
    workers: int

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    @property
    def overhead_ms(self) -> float:
        """Per shard: worker time spent outside the shard's own work."""
        idle = self.seconds * self.workers - sum(self.shard_seconds)
        return 1000 * max(idle, 0.0) / max(len(self.shard_seconds), 1)


class TimedShards:
    """Wraps a shard runner; records the prepare phase's wall time and each shard's own seconds."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner, self.seconds, self.shard_seconds = inner, 0.0, list[float]()

    def __call__(self, shards: Sequence[Any], prepare: Callable[[Any], Any]) -> Any:
        started = time.perf_counter()
        results = self.inner(shards, prepare)
        self.seconds = time.perf_counter() - started
        self.shard_seconds = [s for stats in results for s in stats.shard_seconds]
        return results


def run_variant(admin: str, source: Path, address: str | None, workers: int, **settings: Any) -> Measure:
    name = f"ragingest_bench_scale_{os.getpid()}"
    url = create_database(admin, name, template=TEMPLATE)
    try:
        config = bench_settings(url, dask_address=address, **settings)
        timed = TimedShards(shard_runner_for(config, prepare_stage, prefect=False) or shards_in_order)
        summary = run_ingest(
            config, source, source_name="bench", shard_runner=timed, embedder_factory=process_embedder
        )
    finally:
        drop_database(admin, name)
    return Measure(summary["chunks"]["written"], timed.seconds, timed.shard_seconds, workers)


def start_cluster(workers: int) -> Any:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
    )
    client = Client(cluster)  # type: ignore[no-untyped-call]
    client.wait_for_workers(workers)
    return cluster, client


def subset(root: Path, limit_bytes: int) -> Path:
    """The first pages of `root` (by name) up to `limit_bytes`, copied to a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="ragingest-bench-scale-"))
    total = 0
    for page in sorted(root.rglob("*.md")):
        if total >= limit_bytes:
            break
        shutil.copy(page, folder / page.name)
        total += page.stat().st_size
    return folder


def workload(
    label: str,
    admin: str,
    source: Path,
    clusters: dict[int, str],
    repeats: int,
    **settings: Any,
) -> dict[str, Measure]:
    variants: list[tuple[str, str | None, int]] = [("in-process", None, 1)]
    variants += [(f"dask {n} worker{'s' if n > 1 else ''}", address, n) for n, address in clusters.items()]
    for name, address, n in variants:  # warm-up: imports, the model, each worker's pool
        note(f"{label}: warm-up {name}")
        run_variant(admin, source, address, n, **settings)
    best: dict[str, Measure] = {}
    for turn in range(repeats):
        for name, address, n in rotated(variants, turn):
            measure = run_variant(admin, source, address, n, **settings)
            if name not in best or measure.rate > best[name].rate:
                best[name] = measure
    rows = [
        [f"{label}: {name}", m.chunks, m.seconds, m.rate, len(m.shard_seconds), m.overhead_ms]
        for name, m in best.items()
    ]
    print_table(["variant", "chunks", "prepare s", "chunks/s", "shards", "overhead ms/shard"], rows)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="prefect-docs", help="corpus of the hash workload")
    parser.add_argument("--shard-bytes", type=int, default=256 * 1024)
    parser.add_argument("--local-bytes", type=int, default=160_000, help="pages of the local-model workload")
    parser.add_argument("--local-shard-bytes", type=int, default=16 * 1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()

    admin = server_url()
    create_database(admin, TEMPLATE)
    started = {n: start_cluster(n) for n in (1, 2)}
    clusters = {n: cluster.scheduler_address for n, (cluster, _) in started.items()}
    ratios: dict[str, float | str] = {"cores": str(os.cpu_count())}
    try:
        corpus = CORPORA / args.corpus
        root = corpus / "src" if (corpus / "src").is_dir() else corpus
        hashed = workload("hash", admin, root, clusters, args.repeats, dims=64, shard_bytes=args.shard_bytes)
        ratios |= {
            "hash_1w_vs_inprocess": hashed["dask 1 worker"].rate / hashed["in-process"].rate,
            "hash_2w_vs_1w": hashed["dask 2 workers"].rate / hashed["dask 1 worker"].rate,
            "hash_overhead_ms_per_shard_1w": hashed["dask 1 worker"].overhead_ms,
        }
        if not args.skip_local:
            pages = subset(CORPORA / "rust-book" / "src", args.local_bytes)
            local = workload(
                "local",
                admin,
                pages,
                clusters,
                1,
                embedding_provider="sentence-transformers",
                embedding_model="all-MiniLM-L6-v2",
                shard_bytes=args.local_shard_bytes,
            )
            ratios |= {
                "local_1w_vs_inprocess": local["dask 1 worker"].rate / local["in-process"].rate,
                "local_2w_vs_1w": local["dask 2 workers"].rate / local["dask 1 worker"].rate,
            }
    finally:
        for cluster, client in started.values():
            client.close()
            cluster.close()
        drop_database(admin, TEMPLATE)
    print_ratios(ratios)


if __name__ == "__main__":
    main()
