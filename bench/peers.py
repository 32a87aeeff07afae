"""Ours against LangChain's and LlamaIndex's Postgres vector stores, loading the same rows.

The same pre-computed chunks (text + metadata) and embeddings go into a fresh
database each way, and every loader ends with the same HNSW index (m=16,
ef_construction=64, cosine, `maintenance_work_mem` 1GB, 2 parallel workers),
built after the rows are in, so the comparison is fair:

- ours: the embed stage's cache write (committed per batch of 128), staging COPY,
  `swap_in` (load transaction + index build), then VACUUM ANALYZE. Ours also
  fills a generated tsvector with its GIN index, and a documents table.
- langchain-postgres `PGVector` (v1 API, `add_embeddings` in batches of 1,000: one
  multi-row INSERT each) and `PGVectorStore` (v2 API, the one its docs now
  recommend: one INSERT per row), each followed by CREATE INDEX.
- llama-index-vector-stores-postgres `PGVectorStore.add` (batches of 2,048, the
  insert batch of LlamaIndex's VectorStoreIndex), followed by CREATE INDEX.

Every loader pays the same HNSW build, so no loader can be more than a peer's
total over that build ahead of it: the closing line gives that ceiling for each
peer beside the measured ratio.

The peers run in their own virtualenv (`bench/.peers-venv`, made and filled from
the package registry on first use), in a child process that imports only them.

    python bench/peers.py                 # 20k rows x 384 dims
    python bench/peers.py --rows 50000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PEERS_VENV = BENCH / ".peers-venv"
PEER_PACKAGES = {"langchain": "langchain-postgres", "llamaindex": "llama-index-vector-stores-postgres"}
PEERS = {
    "langchain PGVector (v1)": "langchain",
    "langchain PGVectorStore (v2)": "langchain",
    "llamaindex PGVectorStore": "llamaindex",
}
SHORT = {
    "langchain PGVector (v1)": "langchain_v1",
    "langchain PGVectorStore (v2)": "langchain_v2",
    "llamaindex PGVectorStore": "llamaindex",
}
HNSW_M, HNSW_EF, INDEX_MEMORY, INDEX_WORKERS = 16, 64, "1GB", 2


# --- the peer side: runs in the peers' virtualenv (stdlib, numpy, the peer libraries) -------------


def peer_main(peer: str, data: Path, urls: dict[str, str], dims: int) -> None:
    import numpy as np

    vectors = np.load(data / "vectors.npy")
    records = [json.loads(line) for line in (data / "chunks.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in records]
    metadatas = [r["metadata"] for r in records]
    ids = [r["id"] for r in records]
    embeddings = vectors.tolist()  # what an embedding API hands over: lists of floats
    loaders = {
        "langchain PGVector (v1)": load_langchain_v1,
        "langchain PGVectorStore (v2)": load_langchain_v2,
        "llamaindex PGVectorStore": load_llamaindex,
    }
    load_seconds, table = loaders[peer](urls, texts, embeddings, metadatas, ids, dims)
    index_seconds = build_index(urls["libpq"], table)
    print(json.dumps({"load": load_seconds, "index": index_seconds}))


def load_langchain_v1(
    urls: dict[str, str],
    texts: list[str],
    embeddings: list[list[float]],
    metadatas: list[dict[str, Any]],
    ids: list[str],
    dims: int,
) -> tuple[float, str]:
    from langchain_core.embeddings import FakeEmbeddings
    from langchain_postgres import PGVector

    store = PGVector(
        embeddings=FakeEmbeddings(size=dims),
        connection=urls["psycopg"],
        collection_name="bench",
        embedding_length=dims,
        use_jsonb=True,
    )
    started = time.perf_counter()
    for start in range(0, len(texts), 1000):
        end = start + 1000
        store.add_embeddings(texts[start:end], embeddings[start:end], metadatas[start:end], ids[start:end])
    return time.perf_counter() - started, "langchain_pg_embedding"


def load_langchain_v2(
    urls: dict[str, str],
    texts: list[str],
    embeddings: list[list[float]],
    metadatas: list[dict[str, Any]],
    ids: list[str],
    dims: int,
) -> tuple[float, str]:

    from langchain_core.embeddings import FakeEmbeddings
    from langchain_postgres import PGEngine, PGVectorStore

    engine = PGEngine.from_connection_string(urls["psycopg"])
    engine.init_vectorstore_table(table_name="bench_v2", vector_size=dims)
    store = PGVectorStore.create_sync(
        engine=engine, embedding_service=FakeEmbeddings(size=dims), table_name="bench_v2"
    )
    uuids = [str(uuid.uuid5(uuid.NAMESPACE_URL, i)) for i in ids]  # its id column is a uuid
    started = time.perf_counter()
    for start in range(0, len(texts), 1000):
        end = start + 1000
        store.add_embeddings(texts[start:end], embeddings[start:end], metadatas[start:end], uuids[start:end])
    return time.perf_counter() - started, "bench_v2"


def load_llamaindex(
    urls: dict[str, str],
    texts: list[str],
    embeddings: list[list[float]],
    metadatas: list[dict[str, Any]],
    ids: list[str],
    dims: int,
) -> tuple[float, str]:
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.postgres import PGVectorStore

    store = PGVectorStore(
        connection_string=urls["psycopg2"],
        async_connection_string=urls["asyncpg"],
        table_name="bench",
        embed_dim=dims,
    )
    store.add([])  # creates the table; not timed
    nodes = [
        TextNode(id_=i, text=t, metadata=m, embedding=e)
        for i, t, m, e in zip(ids, texts, metadatas, embeddings, strict=True)
    ]
    started = time.perf_counter()
    for start in range(0, len(nodes), 2048):
        store.add(nodes[start : start + 2048])
    return time.perf_counter() - started, "data_bench"


def build_index(libpq_url: str, table: str) -> float:
    import psycopg
    from psycopg import sql

    with psycopg.connect(libpq_url, autocommit=True) as conn:
        started = time.perf_counter()
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(INDEX_MEMORY)))
            conn.execute(
                sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(INDEX_WORKERS))
            )
            conn.execute(
                sql.SQL(
                    "CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)"
                    " WITH (m = {}, ef_construction = {})"
                ).format(sql.Identifier(table), sql.Literal(HNSW_M), sql.Literal(HNSW_EF))
            )
        return time.perf_counter() - started


# --- our side ------------------------------------------------------------------------------------


def ensure_peers_venv() -> dict[str, str]:
    """Make and fill the peers' virtualenv; returns {peer library: why it cannot be used}."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEERS_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    missing: dict[str, str] = {}
    for library, package in PEER_PACKAGES.items():
        module = {"langchain": "langchain_postgres", "llamaindex": "llama_index.vector_stores.postgres"}[
            library
        ]
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
            continue
        print(f"installing {package} into {PEERS_VENV} ...", flush=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "ERROR" in line or "error" in line]
            missing[library] = f"pip install {package} failed: " + " | ".join(
                lines[-3:] or done.stderr.splitlines()[-3:]
            )
    return missing


def driver_urls(admin: str, dbname: str) -> dict[str, str]:
    import psycopg
    from sqlalchemy.engine import URL

    params = psycopg.conninfo.conninfo_to_dict(psycopg.conninfo.make_conninfo(admin, dbname=dbname))
    host = str(params.get("host", "localhost"))
    query = {"host": host} if host.startswith("/") else {}
    if host.startswith("/") and "port" in params:
        query["port"] = str(params["port"])

    def url(driver: str) -> str:
        return URL.create(
            f"postgresql+{driver}",
            username=str(params.get("user", "postgres")),
            password=str(params["password"]) if params.get("password") else None,
            host=None if host.startswith("/") else host,
            port=None if host.startswith("/") or "port" not in params else int(str(params["port"])),
            database=dbname,
            query=query,
        ).render_as_string(hide_password=False)

    urls = {driver: url(driver) for driver in ("psycopg", "psycopg2", "asyncpg")}
    urls["libpq"] = psycopg.conninfo.make_conninfo(admin, dbname=dbname)
    return urls


def write_data(work: Path, rows: Any) -> None:
    import numpy as np

    np.save(work / "vectors.npy", rows.vectors)
    with (work / "chunks.jsonl").open("w") as out:
        for n, (text, metadata) in enumerate(zip(rows.texts(), rows.metadatas(), strict=True)):
            out.write(json.dumps({"id": f"chunk-{n}", "text": text, "metadata": metadata}) + "\n")


def run_peer(admin: str, peer: str, work: Path, dims: int) -> tuple[float, float]:
    import psycopg
    from common import create_database, drop_database

    url = create_database(admin, "bench_peer", migrate=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    try:
        command = [
            str(PEERS_VENV / "bin" / "python"),
            __file__,
            "--peer",
            peer,
            "--data",
            str(work),
            "--urls",
            json.dumps(driver_urls(admin, "bench_peer")),
            "--dims",
            str(dims),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{peer} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return float(result["load"]), float(result["index"])
    finally:
        drop_database(admin, "bench_peer")


def run_ours(admin: str, rows: Any, dims: int) -> tuple[float, float]:
    from common import BENCH_SOURCE, bench_settings, create_database, drop_database

    from tasks.cache import write_vectors
    from tasks.db import connect
    from tasks.index import vacuum_analyze
    from tasks.load import LoadRequest, swap_in
    from tasks.registry import ensure_ingest_model
    from tasks.staging import StagingTarget, registered_run, stage_documents

    url = create_database(admin, "bench_ours")
    settings = bench_settings(url, dims).model_copy(
        update={
            "index_strategy": "drop",
            "maintenance_work_mem": INDEX_MEMORY,
            "max_parallel_maintenance_workers": INDEX_WORKERS,
        }
    )
    try:
        with connect(url) as conn, connect(url) as keeper, registered_run(keeper, BENCH_SOURCE) as run_key:
            target = StagingTarget(run_key, 0, "bench", {})
            models = ensure_ingest_model(conn, settings)
            key, batch = models[0].model_key, settings.embed_batch_inputs
            started = time.perf_counter()
            for start in range(0, rows.count, batch):
                write_vectors(
                    conn, key, rows.hashes[start : start + batch], rows.vectors[start : start + batch]
                )
            for start in range(0, len(rows.docs), 400):  # 400 pages = 4,000 chunks, a `prepare` step
                stage_documents(conn, target, rows.docs[start : start + 400])
            result = swap_in(conn, LoadRequest(target.run_key, BENCH_SOURCE, models, [], []), settings)
            vacuum_analyze(conn)
            total = time.perf_counter() - started
            assert result.chunks_written == rows.count and result.indexes_built == 1
            return total - result.index_seconds, result.index_seconds
    finally:
        drop_database(admin, "bench_ours")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_main(args.peer, args.data, json.loads(args.urls), args.dims)
        return
    compare(args)


def compare(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    from common import (
        SECTIONS_PER_PAGE,
        Samples,
        make_rows,
        note,
        parsed_pages,
        print_ratios,
        print_table,
        random_vectors,
        rotated,
        server_url,
    )

    missing = ensure_peers_venv()
    for library, why in missing.items():
        note(f"{library}: cannot be installed here: {why}")
    admin = server_url()
    docs = parsed_pages(-(-args.rows // SECTIONS_PER_PAGE))
    rows = make_rows(docs, random_vectors(sum(len(c) for _, c in docs), args.dims))
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-peers-"))
    write_data(work, rows)
    note(
        f"{rows.count:,} chunks x {args.dims} dims; every loader ends with the same HNSW build "
        f"(m={HNSW_M}, ef_construction={HNSW_EF}, {INDEX_MEMORY}, {INDEX_WORKERS} workers)."
        f" Medians of {args.repeats}."
    )
    names = ["ours"] + [peer for peer, library in PEERS.items() if library not in missing]
    load = {name: Samples(name) for name in names}
    index = {name: Samples(name) for name in names}
    try:
        for turn in range(args.repeats):
            for name in rotated(names, turn):
                seconds = (
                    run_ours(admin, rows, args.dims)
                    if name == "ours"
                    else run_peer(admin, name, work, args.dims)
                )
                load[name].seconds.append(seconds[0])
                index[name].seconds.append(seconds[1])
                note(f"   {name}: load {seconds[0]:.2f}s + index {seconds[1]:.2f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours_total = load["ours"].median + index["ours"].median
    table = []
    for name in names:
        total = load[name].median + index[name].median
        table.append(
            (
                name,
                load[name].median,
                rows.count / load[name].median,
                index[name].median,
                total,
                total / ours_total,
                load[name].median / load["ours"].median,
            )
        )
    print_table(
        ["loader", "load s", "rows/s", "index s", "total s", "x ours (total)", "x ours (load)"], table
    )
    ratios: dict[str, float | str] = {}
    for name in names[1:]:
        short = SHORT[name]
        ratios[f"{short}_vs_ours"] = (load[name].median + index[name].median) / ours_total
        ratios[f"{short}_load_vs_ours"] = load[name].median / load["ours"].median
        # The most any loader could be ahead of this peer: its own HNSW build alone.
        ratios[f"{short}_ceiling"] = (load[name].median + index[name].median) / index[name].median
    for library in missing:
        ratios[library] = "not-installable"
    print_ratios(ratios)


if __name__ == "__main__":
    main()
