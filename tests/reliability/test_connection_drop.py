"""Database connections dropped mid-run (`pg_terminate_backend`).

The run is retried, or it fails cleanly (one readable line, no partial write) and
the rerun completes with every invariant holding.
"""

from __future__ import annotations

import contextlib
import random
import threading
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flows.ingest import run_ingest
from tasks.db import Connection, index_validity, verify_schema
from tasks.registry import EmbeddingModel, create_hnsw_index, drop_hnsw_index, get_model
from tests.conftest import make_settings
from tests.fake_openai import FakeEmbeddingsServer
from tests.reliability.harness import (
    Corpus,
    Stage,
    active_statements,
    check_invariants,
    error_line,
    fork_cli,
    table_snapshot,
    terminate_sessions,
    wait_for_sessions_to_end,
    wait_for_stage,
    wait_until,
    worker_env,
)
from tests.reliability.report import CaseFigures

SCENARIO = "Database connection dropped mid-run"
SOURCE = "kb"
TRIALS = 2
MAX_ATTEMPTS = 6
API_KEY = "sk-reliability-drop"

# Where the connections are cut: while batches are out at the embeddings API, inside
# the load transaction, and during the index rebuild of a bulk load.
POINTS = {
    "embed": None,
    "load": Stage("load transaction", "%INSERT INTO chunks%", max_offset=0.1),
    "index": Stage("index rebuild", "CREATE INDEX%", max_offset=0.03),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_dropped_connections_fail_cleanly_and_the_rerun_completes(
    point: str,
    database_url: str,
    conn: Connection,
    monitor: Connection,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    rng: random.Random,
    figures: CaseFigures,
) -> None:
    strategy = "drop" if point == "index" else "keep"
    settings = make_settings(
        database_url,
        embedding_provider="openai",
        embedding_model="text-embedding-3-small",
        embedding_dimensions=64,
        openai_api_key=API_KEY,
        openai_base_url=server.base_url,
        index_strategy=strategy,
        lock_timeout_seconds=30,
    )
    corpus = Corpus(tmp_path / "kb", files=24, sections=10).write()
    run_ingest(settings, corpus.root, source_name=SOURCE)
    app = f"reliability-drop-{tmp_path.name}"
    env = worker_env(
        database_url,
        app,
        EMBEDDING_PROVIDER="openai",
        EMBEDDING_MODEL="text-embedding-3-small",
        EMBEDDING_DIMENSIONS="64",
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=server.base_url,
        RAGINGEST_INDEX_STRATEGY=strategy,
        RAGINGEST_EMBED_BATCH_INPUTS="8",
        RAGINGEST_EMBED_CONCURRENCY="1",
    )
    server.latency = 0.02 if point == "embed" else 0.0
    for trial in range(TRIALS):
        code, output, before = drop_connections_during(
            point, corpus, env, app, monitor, server, rng, figures, tmp_path / f"worker{trial}.log"
        )
        if code == 0:
            figures.notes.append(f"{point}: the run retried and completed despite the dropped connections")
        else:
            message = error_line(output)
            figures.messages.append(message)
            assert table_snapshot(conn) == before, "a dropped connection left a partial load"
        figures.runs += 1
        run_ingest(settings, corpus.root, source_name=SOURCE)
        report = check_invariants(
            conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks()
        )
        figures.rows_checked += report.rows_expected
        figures.rows_lost += report.rows_lost
        assert report.problems == []


def drop_connections_during(
    point: str,
    corpus: Corpus,
    env: dict[str, str],
    app: str,
    monitor: Connection,
    server: FakeEmbeddingsServer,
    rng: random.Random,
    figures: CaseFigures,
    log: Path,
) -> tuple[int, str, Any]:
    """Start the CLI and cut its connections at `point`.

    Returns the CLI's exit code, its output, and the tables as they were before the run.
    """
    args = ["ingest", str(corpus.root), "--source-name", SOURCE, "--no-prefect"]
    for _ in range(MAX_ATTEMPTS):
        corpus.bump(rng, 0.3)
        before = table_snapshot(monitor)
        server.reset_counters()
        figures.runs += 1
        with fork_cli(args, env, log) as worker:
            if reached(point, worker, monitor, app, server, rng):
                dropped = terminate_sessions(monitor, app)
                figures.faults += dropped
                code = worker.wait()
                wait_for_sessions_to_end(monitor, app)
                assert dropped > 0
                return code, worker.output(), before
            assert worker.wait() == 0, worker.output()
    pytest.fail(f"the worker never reached {point} in {MAX_ATTEMPTS} runs")


def reached(
    point: str, worker: Any, monitor: Connection, app: str, server: FakeEmbeddingsServer, rng: random.Random
) -> bool:
    stage = POINTS[point]
    if stage is not None:
        return wait_for_stage(worker, monitor, app, stage, rng) is not None
    requests = rng.randint(1, 4)
    wait_until(lambda: server.request_count >= requests or not worker.running, "embedding requests")
    return bool(worker.running)


def test_a_cut_off_create_index_concurrently_leaves_an_invalid_index_that_the_next_ingest_rebuilds(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    settings = make_settings(database_url)
    corpus = Corpus(tmp_path / "kb", files=40, sections=15).write()
    run_ingest(settings, corpus.root, source_name=SOURCE)
    model = get_model(conn, "test_64")
    assert model is not None
    app = f"reliability-cic-{tmp_path.name}"
    for _ in range(MAX_ATTEMPTS):
        drop_hnsw_index(conn, model)
        with psycopg.connect(database_url, autocommit=True, application_name=app) as builder:
            build = threading.Thread(target=build_index_concurrently, args=(builder, model))
            build.start()
            wait_until(partial(building_or_done, monitor, app, build), "the concurrent index build")
            figures.faults += terminate_sessions(monitor, app)
            build.join(30)
        if index_validity(conn).get(model.index_name) is False:
            break
    else:
        pytest.fail(f"no cut landed inside CREATE INDEX CONCURRENTLY in {MAX_ATTEMPTS} tries")
    assert "INVALID" in " ".join(verify_schema(conn))

    figures.runs += 1
    summary = run_ingest(settings, corpus.root, source_name=SOURCE)  # nothing changed on disk
    assert summary["index"]["rebuilt"] == 1
    report = check_invariants(conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks())
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == []


def building_or_done(monitor: Connection, app: str, build: threading.Thread) -> bool:
    return bool(active_statements(monitor, app, "CREATE INDEX CONCURRENTLY%")) or not build.is_alive()


def build_index_concurrently(builder: Connection, model: EmbeddingModel) -> None:
    with contextlib.suppress(psycopg.OperationalError):  # the cut is the point
        create_hnsw_index(builder, model, concurrently=True)
