"""Concurrent runs: two ingests at once, an ingest during a backfill, two backfills of one model.

Runs that overlap either wait for each other or stop with a message that says
what holds them up; either way no row is duplicated and nothing is lost.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from flows.backfill import run_backfill
from flows.ingest import run_ingest
from tasks.db import Connection, connect
from tasks.load import acquire_load_lock, release_load_lock
from tests.conftest import make_settings
from tests.fake_openai import FakeEmbeddingsServer
from tests.reliability.harness import (
    Corpus,
    check_invariants,
    error_line,
    fork_cli,
    sessions_waiting_for_a_lock,
    wait_until,
    worker_env,
)
from tests.reliability.report import CaseFigures

SCENARIO = "Concurrent runs"
SOURCE = "kb"
API_KEY = "sk-reliability-concurrency"
HASH_MODEL = {"EMBEDDING_PROVIDER": "hash", "EMBEDDING_MODEL": "test", "EMBEDDING_DIMENSIONS": "64"}
OPENAI_BACKFILL = ["--provider", "openai", "--model", "text-embedding-3-small", "--dimensions", "64"]


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus(tmp_path / "kb", files=30, sections=8).write()


@contextmanager
def held_load_lock(database_url: str) -> Iterator[None]:
    """Hold the load lock from a session of the test's own, as a run in progress does."""
    with connect(database_url) as holder:
        acquire_load_lock(holder, 5)
        try:
            yield
        finally:
            release_load_lock(holder)


def ingest_args(corpus: Corpus, *extra: str) -> list[str]:
    return ["ingest", str(corpus.root), "--source-name", SOURCE, "--no-prefect", *extra]


def json_summary(output: str) -> dict[str, Any]:
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    summary: dict[str, Any] = json.loads(line)
    return summary


def check(conn: Connection, corpus: Corpus, figures: CaseFigures) -> None:
    report = check_invariants(conn, source=SOURCE, root=corpus.root, expected_chunks=corpus.expected_chunks())
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == []


def test_two_ingests_started_together_run_one_after_the_other_without_duplicates(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    corpus: Corpus,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    app = f"reliability-twin-{tmp_path.name}"
    env = worker_env(database_url, app, **HASH_MODEL)
    with ExitStack() as running:
        with held_load_lock(database_url):  # both runs queue behind the test's lock
            workers = [
                running.enter_context(fork_cli(ingest_args(corpus, "--json"), env, tmp_path / f"twin{i}.log"))
                for i in range(2)
            ]
            figures.runs += 2
            wait_until(
                lambda: sessions_waiting_for_a_lock(monitor, app) == 2, "both runs to wait for the load lock"
            )
        codes = [worker.wait() for worker in workers]

    assert codes == [0, 0], [worker.output() for worker in workers]
    written = sorted(json_summary(worker.output())["chunks"]["written"] for worker in workers)
    assert written == [0, sum(corpus.expected_chunks().values())]  # the second found everything done
    check(conn, corpus, figures)


def test_an_ingest_that_cannot_get_the_lock_in_time_stops_with_a_clear_message(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    corpus: Corpus,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    app = f"reliability-late-{tmp_path.name}"
    late_env = worker_env(database_url, app, **HASH_MODEL, RAGINGEST_LOCK_TIMEOUT_SECONDS="0.5")
    with held_load_lock(database_url):  # a swap that takes longer than the late run will wait
        with fork_cli(ingest_args(corpus), late_env, tmp_path / "late.log") as late:
            late_code = late.wait()
    figures.runs += 1
    figures.faults += 1

    assert late_code == 1, late.output()
    message = error_line(late.output())
    figures.messages.append(message)
    assert "another ingest or backfill is loading into this database; waited 0.5 s" in message
    assert "RAGINGEST_LOCK_TIMEOUT_SECONDS" in message
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)  # nothing reached the tables
    assert conn.execute("SELECT count(*) FROM ingest_stage_chunks").fetchone() == (0,)


def test_a_run_that_is_only_embedding_holds_no_lock(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    corpus: Corpus,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    """A slow run embedding one source never holds up the swap of another source, nor a backfill."""
    server.latency = 0.2
    api = {
        "EMBEDDING_PROVIDER": "openai",
        "EMBEDDING_MODEL": "text-embedding-3-small",
        "EMBEDDING_DIMENSIONS": "64",
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": server.base_url,
        "RAGINGEST_EMBED_BATCH_INPUTS": "5",
        "RAGINGEST_EMBED_CONCURRENCY": "1",
        "RAGINGEST_LOCK_TIMEOUT_SECONDS": "0.5",
    }
    other = Corpus(tmp_path / "other", files=4, sections=2).write()
    slow_app, quick_app = f"reliability-slow-{tmp_path.name}", f"reliability-quick-{tmp_path.name}"
    with fork_cli(
        ingest_args(corpus), worker_env(database_url, slow_app, **api), tmp_path / "slow.log"
    ) as slow:
        wait_until(lambda: server.request_count >= 3 or not slow.running, "the slow run to embed")
        assert slow.running, slow.output()
        quick_args = ["ingest", str(other.root), "--source-name", "other", "--no-prefect"]
        with fork_cli(
            quick_args, worker_env(database_url, quick_app, **api), tmp_path / "quick.log"
        ) as quick:
            quick_code = quick.wait()
        assert slow.running, "the quick run must finish while the slow one is still embedding"
        slow_code = slow.wait()
    figures.runs += 2

    assert (quick_code, slow_code) == (0, 0), quick.output() + slow.output()
    check(conn, corpus, figures)
    other_chunks = conn.execute(
        "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.source = 'other'"
    ).fetchone()
    assert other_chunks == (sum(other.expected_chunks().values()),)


def test_an_ingest_during_a_backfill_leaves_both_columns_complete(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    corpus: Corpus,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    rng: random.Random,
    figures: CaseFigures,
) -> None:
    settings = make_settings(database_url)
    run_ingest(settings, corpus.root, source_name=SOURCE)
    backfill_app, ingest_app = f"reliability-bf-{tmp_path.name}", f"reliability-in-{tmp_path.name}"
    api = {
        **HASH_MODEL,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": server.base_url,
        "RAGINGEST_EMBED_BATCH_INPUTS": "20",
    }
    backfill_args = ["backfill", *OPENAI_BACKFILL, "--batch-size", "40", "--no-prefect"]
    with ExitStack() as running:
        with held_load_lock(database_url):  # the backfill's first write and the ingest both queue behind it
            backfill = running.enter_context(
                fork_cli(
                    backfill_args, worker_env(database_url, backfill_app, **api), tmp_path / "backfill.log"
                )
            )
            wait_until(
                lambda: sessions_waiting_for_a_lock(monitor, backfill_app) == 1 or not backfill.running,
                "the backfill's first batch to wait for the load lock",
            )
            assert backfill.running, backfill.output()
            corpus.bump(rng, 0.3)
            ingest = running.enter_context(
                fork_cli(
                    ingest_args(corpus, "--json"),
                    worker_env(database_url, ingest_app, **api),
                    tmp_path / "ingest.log",
                )
            )
            wait_until(
                lambda: sessions_waiting_for_a_lock(monitor, ingest_app) == 1 or not ingest.running,
                "the ingest to wait for the load lock",
            )
        ingest_code, backfill_code = ingest.wait(), backfill.wait()
    figures.runs += 3

    assert ingest_code == 0, ingest.output()
    assert backfill_code == 0, backfill.output()
    assert json_summary(ingest.output())["models"] == ["test_64", "text_embedding_3_small_64"]
    check(conn, corpus, figures)  # both columns full, both indexes valid, no duplicates


def test_a_backfill_held_up_by_a_long_ingest_stops_with_a_clear_message_and_resumes(
    database_url: str,
    conn: Connection,
    corpus: Corpus,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    settings = make_settings(database_url)
    run_ingest(settings, corpus.root, source_name=SOURCE)
    env = worker_env(
        database_url, f"reliability-held-{tmp_path.name}", **HASH_MODEL, RAGINGEST_LOCK_TIMEOUT_SECONDS="0.5"
    )
    with held_load_lock(database_url):  # as a long ingest would
        with fork_cli(
            ["backfill", "--provider", "hash", "--model", "test", "--dimensions", "96", "--no-prefect"],
            env,
            tmp_path / "backfill.log",
        ) as backfill:
            code = backfill.wait()
    figures.runs += 2
    figures.faults += 1

    assert code == 1
    message = error_line(backfill.output())
    figures.messages.append(message)
    assert "the backfill of test_96 stopped and resumes where it stopped when run again" in message
    assert conn.execute(
        sql.SQL("SELECT count(*) FROM chunks WHERE {} IS NOT NULL").format(sql.Identifier("emb_test_96"))
    ).fetchone() == (0,)
    summary = run_backfill(settings, provider="hash", model="test", dimensions=96)
    assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]
    check(conn, corpus, figures)


def test_a_second_backfill_of_the_same_model_is_refused_while_the_first_runs(
    database_url: str,
    conn: Connection,
    monitor: Connection,
    corpus: Corpus,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    figures: CaseFigures,
) -> None:
    run_ingest(make_settings(database_url), corpus.root, source_name=SOURCE)
    first_app = f"reliability-first-{tmp_path.name}"
    api = {**HASH_MODEL, "OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": server.base_url}
    args = ["backfill", *OPENAI_BACKFILL, "--batch-size", "40", "--no-prefect"]
    with fork_cli(args, worker_env(database_url, first_app, **api), tmp_path / "first.log") as first:
        with held_load_lock(
            database_url
        ):  # keeps the first backfill at its first write, holding its model's lock
            wait_until(
                lambda: sessions_waiting_for_a_lock(monitor, first_app) == 1 or not first.running,
                "the first backfill to reach its first write",
            )
            assert first.running, first.output()
            second_env = worker_env(database_url, f"reliability-second-{tmp_path.name}", **api)
            with fork_cli(args, second_env, tmp_path / "second.log") as second:
                second_code = second.wait()
        first_code = first.wait()
    figures.runs += 2

    assert (first_code, second_code) == (0, 1), first.output()
    message = error_line(second.output())
    figures.messages.append(message)
    assert "a backfill of text_embedding_3_small_64 is already running" in message
    check(conn, corpus, figures)
