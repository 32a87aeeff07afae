"""A flaky embeddings API, and one that is down.

Through a flaky API the ingest completes with every vector. When the API is
down the run fails clearly, changes nothing, and loses nothing it paid for.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.records import sha256_text
from tests.fake_openai import FakeEmbeddingsServer, Fault, FaultKind
from tests.fix_openai import loopback_settings
from tests.reliability.harness import (
    Corpus,
    check_invariants,
    error_line,
    fork_cli,
    table_snapshot,
    wait_until,
    worker_env,
)
from tests.reliability.report import SEED, CaseFigures

SCENARIO = "Flaky or unavailable embeddings API"
SOURCE = "kb"
MODEL_KEY = "openai:text-embedding-3-small:64"
API_KEY = "sk-reliability-flaky"


def api_settings(database_url: str, server: FakeEmbeddingsServer, **overrides: Any) -> Any:
    return loopback_settings(database_url, server, API_KEY, **({"lock_timeout_seconds": 30} | overrides))


def api_env(database_url: str, server: FakeEmbeddingsServer, app: str, **extra: str) -> dict[str, str]:
    return worker_env(
        database_url,
        app,
        EMBEDDING_PROVIDER="openai",
        EMBEDDING_MODEL="text-embedding-3-small",
        EMBEDDING_DIMENSIONS="64",
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=server.base_url,
        **extra,
    )


def cached_hashes(conn: Connection) -> set[bytes]:
    rows = conn.execute("SELECT content_hash FROM embedding_cache WHERE model_key = %s", (MODEL_KEY,))
    return {bytes(row[0]) for row in rows}


def test_half_the_requests_fail_and_the_ingest_still_completes_with_every_vector(
    database_url: str,
    conn: Connection,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    # A few faults carry Retry-After (seconds or milliseconds); then half of all requests fail at random.
    server.script(
        [
            Fault.rate_limit(retry_after=0.05),
            Fault.server_error(503, retry_after_ms=30),
            Fault.rate_limit(retry_after_ms=20),
            Fault.server_error(500),
            Fault.timeout(hold_seconds=2.0),
        ]
    )
    server.random_faults(0.5, seed=SEED, kinds=("rate_limit", "server_error", "timeout"), hold_seconds=2.0)
    corpus = Corpus(tmp_path / "kb", files=20, sections=5).write()
    settings = api_settings(
        database_url,
        server,
        embed_batch_inputs=4,
        embed_concurrency=4,
        embed_max_attempts=40,
        embed_max_backoff_seconds=0.05,
        embed_timeout_seconds=0.5,
    )
    figures.runs += 1
    summary = run_ingest(settings, corpus.root, source_name=SOURCE)
    assert server.wait_for_in_flight(0, 10)

    records = server.requests
    faults = [record.fault for record in records if record.fault is not None]
    figures.faults += len(faults)
    report = check_invariants(
        conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks(), vector_sample=10_000
    )
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == []
    assert (
        report.vectors_checked == report.chunks == summary["chunks"]["written"]
    )  # every vector is the API's
    assert {FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.TIMEOUT} <= set(faults)
    assert 0.3 <= len(faults) / len(records) <= 0.7, f"{len(faults)} faults in {len(records)} requests"
    # Every request was one attempt of one batch: the failed ones are exactly the retries.
    embeddings = summary["embeddings"]
    assert len(records) == embeddings["batches"] + embeddings["retries"]
    assert embeddings["retries"] >= len(faults)
    figures.notes.append(f"{len(faults)} of {len(records)} requests failed; {embeddings['retries']} retries")


def test_an_api_down_for_the_whole_run_fails_clearly_and_changes_nothing(
    database_url: str,
    conn: Connection,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    figures: CaseFigures,
    rng: random.Random,
) -> None:
    corpus = Corpus(tmp_path / "kb", files=12, sections=4).write()
    settings = api_settings(database_url, server, embed_max_attempts=3, embed_max_backoff_seconds=0.05)
    run_ingest(settings, corpus.root, source_name=SOURCE)
    corpus.bump(rng, 0.5)
    before, cache_before = table_snapshot(conn), cached_hashes(conn)
    server.down()
    server.reset_counters()
    env = api_env(
        database_url,
        server,
        f"reliability-down-{tmp_path.name}",
        RAGINGEST_EMBED_MAX_ATTEMPTS="3",
        RAGINGEST_EMBED_MAX_BACKOFF_SECONDS="0.05",
    )
    figures.runs += 2
    with fork_cli(
        ["ingest", str(corpus.root), "--source-name", SOURCE, "--no-prefect"], env, tmp_path / "down.log"
    ) as worker:
        code = worker.wait()
    figures.faults += server.request_count

    assert code == 1
    message = error_line(worker.output())
    figures.messages.append(message)
    assert "embedding API answered 503" in message and f"model {MODEL_KEY}" in message and "texts " in message
    assert table_snapshot(conn) == before
    assert cached_hashes(conn) == cache_before and server.texts_embedded == 0

    server.up()
    summary = run_ingest(settings, corpus.root, source_name=SOURCE)
    report = check_invariants(conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks())
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == [] and summary["chunks"]["written"] > 0


def test_an_api_that_goes_down_mid_run_keeps_the_paid_batches_and_the_rerun_embeds_only_the_rest(
    database_url: str,
    conn: Connection,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    figures: CaseFigures,
    rng: random.Random,
) -> None:
    corpus = Corpus(tmp_path / "kb", files=12, sections=4).write()
    settings = api_settings(database_url, server, embed_batch_inputs=4, embed_concurrency=1)
    run_ingest(settings, corpus.root, source_name=SOURCE)
    corpus.bump(rng, 1.0)
    before, cache_before = table_snapshot(conn), cached_hashes(conn)
    server.reset_counters()
    server.latency = 0.02
    env = api_env(
        database_url,
        server,
        f"reliability-downmid-{tmp_path.name}",
        RAGINGEST_EMBED_BATCH_INPUTS="4",
        RAGINGEST_EMBED_CONCURRENCY="1",
        RAGINGEST_EMBED_MAX_ATTEMPTS="3",
        RAGINGEST_EMBED_MAX_BACKOFF_SECONDS="0.05",
    )
    answered_before_outage = rng.randint(2, 8)
    figures.runs += 2
    with fork_cli(
        ["ingest", str(corpus.root), "--source-name", SOURCE, "--no-prefect"], env, tmp_path / "down.log"
    ) as worker:
        wait_until(
            lambda: server.request_count >= answered_before_outage or not worker.running,
            "the first embedding requests",
        )
        server.down()
        code = worker.wait()
    figures.faults += sum(1 for record in server.requests if record.fault is FaultKind.DOWN)

    assert code == 1, worker.output()
    message = error_line(worker.output())
    figures.messages.append(message)
    assert "embedding API answered 503" in message
    assert table_snapshot(conn) == before
    paid = cached_hashes(conn) - cache_before
    assert paid and paid == {
        sha256_text(text) for text in server.embedded_texts
    }  # every paid batch is cached

    server.up()
    server.reset_counters()
    summary = run_ingest(settings, corpus.root, source_name=SOURCE)
    embedded_again = {sha256_text(text) for text in server.embedded_texts}
    assert not embedded_again & paid
    assert summary["embeddings"]["cache_hits"] >= len(paid)
    assert summary["embeddings"]["embedded"] == summary["embeddings"]["cache_misses"] == len(embedded_again)
    report = check_invariants(conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks())
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == []
    figures.notes.append(
        f"{len(paid)} texts paid before the outage were reused; {len(embedded_again)} embedded after"
    )
