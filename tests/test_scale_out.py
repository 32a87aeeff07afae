"""Shards prepared on Dask: a real `dask scheduler` and workers (tests/fix_dask.py), a real Postgres.

The rows a cluster stores are the rows an in-process run stores; a worker killed
mid-run costs nothing already cached; a lost cluster fails the run and leaves
the database as it was; task runs on the workers report to the flow's own
Prefect API, so no worker starts a Prefect server of its own.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from config.settings import Settings
from flows.ingest import prepare_stage, run_ingest, shards_in_order
from tasks.registry import EmbeddingModel
from tasks.runners import (
    ClusterError,
    DaskShards,
    choose_runner,
    is_loopback,
    process_embedder,
    shard_runner_for,
)
from tests.conftest import CORPORA, TEMPLATE_DB, make_settings
from tests.fake_openai import FakeEmbeddingsServer
from tests.fix_dask import DaskCluster
from tests.fix_openai import loopback_settings
from tests.fix_prefect import (
    BIN,
    RUN_SECONDS,
    PrefectServer,
    api,
    background,
    call,
    run_artifacts,
    start_run,
    tail,
)

pytestmark = pytest.mark.cluster

RUST_BOOK = CORPORA / "rust-book" / "src"
SHARD_BYTES = 64 * 1024
ROWS = (
    "SELECT d.path, c.ordinal, c.embed_hash, c.content, c.emb_test_64::text"
    " FROM chunks c JOIN documents d ON d.id = c.document_id ORDER BY d.path, c.ordinal"
)
API_KEY = "sk-scale-" + uuid.uuid4().hex
MODEL_ROWS = ROWS.replace("emb_test_64", "emb_text_embedding_3_small_64")
MISSING_VECTORS = "SELECT count(*) FROM chunks WHERE emb_text_embedding_3_small_64 IS NULL"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def another_database(server_url: str, template_url: str) -> Iterator[Callable[[], str]]:
    """Fresh databases cloned from the migrated template, dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"ragingest_scale_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
                )
            )
        made.append(name)
        return psycopg.conninfo.make_conninfo(server_url, dbname=name)

    yield make
    with psycopg.connect(server_url, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def stored_rows(url: str, query: str = ROWS) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode()).fetchall()


def counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks),"
            " (SELECT count(*) FROM embedding_cache)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def ingest(settings: Settings, *, prefect: bool = False, source: Path = RUST_BOOK) -> dict[str, Any]:
    runner = shard_runner_for(settings, prepare_stage, prefect=prefect) or shards_in_order
    return run_ingest(settings, source, source_name="rust-book", shard_runner=runner)


def openai_settings(url: str, server: FakeEmbeddingsServer, **overrides: Any) -> Settings:
    small = {"embed_batch_inputs": 16, "shard_bytes": SHARD_BYTES}
    return loopback_settings(url, server, API_KEY, **(small | overrides))


def verify(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    command = [str(Path(sys.executable).parent / "ragingest"), "db", "verify"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def table_values(artifact: Any) -> dict[str, Any]:
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {row["metric"]: row["value"] for row in rows}


def worker_children(cluster: DaskCluster) -> list[str]:
    """Processes the workers started (a temporary Prefect server would be one)."""
    found = []
    for worker in cluster.workers:
        if worker.poll() is None:
            found += [" ".join(p.cmdline()) for p in psutil.Process(worker.pid).children(recursive=True)]
    return found


# --- choosing the runner ---------------------------------------------------------------------


def test_the_default_runs_in_process_and_the_settings_choose_a_cluster(database_url: str) -> None:
    assert choose_runner(make_settings(database_url)).kind == "in-process"
    assert shard_runner_for(make_settings(database_url), prepare_stage, prefect=False) is None
    local = choose_runner(make_settings(database_url, workers=3))
    assert (local.kind, local.workers, local.address) == ("dask-local", 3, None)
    remote = choose_runner(make_settings(database_url, dask_address="tcp://10.0.0.5:8786"))
    assert (remote.kind, remote.address) == ("dask", "tcp://10.0.0.5:8786")
    with pytest.raises(ClusterError, match="not both"):
        choose_runner(make_settings(database_url, workers=2, dask_address="tcp://127.0.0.1:8786"))


def test_a_remote_cluster_with_the_embedded_database_is_refused_with_the_reason() -> None:
    embedded = Settings(embedding_provider="hash", dask_address="tcp://10.0.0.5:8786")
    with pytest.raises(ClusterError, match="DATABASE_URL") as refused:
        choose_runner(embedded)
    assert refused.value.address == "tcp://10.0.0.5:8786"
    assert (
        choose_runner(Settings(embedding_provider="hash", dask_address="tcp://127.0.0.1:8786")).kind == "dask"
    )
    assert [is_loopback(a) for a in ("tcp://localhost:1", "tcp://127.0.0.2:1", "tcp://[::1]:1")] == [True] * 3
    assert not is_loopback("http://prefect.internal:4200/api")


def test_a_process_keeps_one_embedder_per_model(database_url: str) -> None:
    settings = make_settings(database_url)
    model = EmbeddingModel("test_64", "hash", "test", 64, "emb_test_64", "vector", 16, 64, "active")
    other = EmbeddingModel("test_32", "hash", "test", 32, "emb_test_32", "vector", 16, 64, "active")

    assert process_embedder(model, settings) is process_embedder(model, settings)
    assert process_embedder(other, settings) is not process_embedder(model, settings)
    assert process_embedder(other, settings).dimensions == 32


# --- the same rows, wherever the shards ran --------------------------------------------------


def test_a_cluster_and_local_workers_store_the_rows_of_an_in_process_run(
    dask_cluster: DaskCluster, another_database: Callable[[], str]
) -> None:
    here, there, local = another_database(), another_database(), another_database()

    in_process = ingest(make_settings(here, shard_bytes=SHARD_BYTES))
    on_cluster = ingest(make_settings(there, shard_bytes=SHARD_BYTES, dask_address=dask_cluster.address))
    on_local = ingest(make_settings(local, shard_bytes=SHARD_BYTES, workers=2))

    expected = stored_rows(here)
    assert len(expected) > 500
    assert stored_rows(there) == expected
    assert stored_rows(local) == expected
    assert in_process["execution"]["runner"] == "in-process"
    assert (on_cluster["execution"]["runner"], on_cluster["execution"]["workers"]) == ("dask", 2)
    assert (on_local["execution"]["runner"], on_local["execution"]["workers"]) == ("dask-local", 2)
    assert on_cluster["execution"]["shards"] == in_process["execution"]["shards"] > 1
    assert on_cluster["chunks"] == in_process["chunks"]


# --- failures ----------------------------------------------------------------------------------


def run_in_thread(work: Callable[[], dict[str, Any]]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = work()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def cached_count(url: str) -> int:
    return counts(url)[2]


def test_a_worker_killed_mid_run_costs_nothing_already_cached(
    dask_cluster: DaskCluster, database_url: str
) -> None:
    with FakeEmbeddingsServer(dimensions=64, latency=0.05, required_api_key=API_KEY) as server:
        settings = openai_settings(database_url, server, dask_address=dask_cluster.address)
        thread, outcome = run_in_thread(lambda: ingest(settings))
        assert server.wait_for_in_flight(1, timeout=120), dask_cluster.logs()
        while server.request_count < 6 and thread.is_alive():
            server.wait_for_in_flight(1, timeout=5)
        dask_cluster.kill_worker(0)
        cached_at_kill = cached_count(database_url)
        server.reset_counters()
        thread.join(timeout=600)
        embedded_after_kill = server.texts_embedded

    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    unique_texts = cached_count(database_url)
    assert summary["chunks"]["written"] == counts(database_url)[1] > 0
    assert 0 < cached_at_kill < unique_texts
    assert embedded_after_kill <= unique_texts - cached_at_kill
    result = verify(database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute(MISSING_VECTORS).fetchone() == (0,)
    assert API_KEY not in dask_cluster.logs()


def test_a_lost_cluster_fails_the_run_and_leaves_the_database_as_it_was(
    dask_cluster: DaskCluster, database_url: str, tmp_path: Path
) -> None:
    pages = sorted(RUST_BOOK.glob("*.md"))
    kb = tmp_path / "kb"
    kb.mkdir()
    for page in pages[: len(pages) // 2]:
        shutil.copy(page, kb / page.name)
    with FakeEmbeddingsServer(dimensions=64, latency=0.05, required_api_key=API_KEY) as server:
        ingest(openai_settings(database_url, server), source=kb)  # a first load the failed run must keep
        before = stored_rows(database_url, MODEL_ROWS)
        for page in pages[len(pages) // 2 :]:
            shutil.copy(page, kb / page.name)
        settings = openai_settings(database_url, server, dask_address=dask_cluster.address)
        server.reset_counters()
        thread, outcome = run_in_thread(lambda: ingest(settings, source=kb))
        assert server.wait_for_in_flight(1, timeout=120), dask_cluster.logs()
        dask_cluster.kill_all()
        thread.join(timeout=600)
        assert not thread.is_alive()

        error = outcome.get("error")
        assert isinstance(error, ClusterError), repr(error)
        assert "lost the Dask cluster at " + dask_cluster.address in str(error)
        assert "nothing was loaded" in str(error)
        assert stored_rows(database_url, MODEL_ROWS) == before

        rerun = ingest(openai_settings(database_url, server), source=kb)
    assert rerun["documents"]["new"] == len(pages) - len(pages) // 2
    assert rerun["chunks"]["total"] == counts(database_url)[1] > len(before)
    with psycopg.connect(database_url) as conn:
        assert conn.execute(MISSING_VECTORS).fetchone() == (0,)


def test_an_unreachable_cluster_is_a_clear_error(database_url: str) -> None:
    from tests.fix_dask import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    runner = shard_runner_for(make_settings(database_url, dask_address=address), prepare_stage, prefect=False)
    assert isinstance(runner, DaskShards)
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at " + address):
        ingest(make_settings(database_url, dask_address=address))


# --- Prefect task runs on the workers ----------------------------------------------------------


@pytest.mark.prefect
def test_prefect_task_runs_on_the_cluster_start_no_server_on_the_workers(
    dask_cluster: DaskCluster, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.ingest import ingest as ingest_flow

    for name, value in {
        "DATABASE_URL": database_url,
        "EMBEDDING_PROVIDER": "hash",
        "EMBEDDING_MODEL": "test",
        "EMBEDDING_DIMENSIONS": "64",
        "RAGINGEST_SHARD_BYTES": str(SHARD_BYTES),
    }.items():
        monkeypatch.setenv(name, value)
    summary = ingest_flow(source=str(RUST_BOOK), source_name="rust-book", cluster=dask_cluster.address)

    assert isinstance(summary, dict), summary
    assert (summary["execution"]["runner"], summary["execution"]["workers"]) == ("dask", 2)
    assert summary["chunks"]["written"] == counts(database_url)[1] > 500
    assert worker_children(dask_cluster) == []


# --- one API budget across the workers ---------------------------------------------------------


def most_requests_in_a_second(server: FakeEmbeddingsServer) -> int:
    starts = sorted(record.started for record in server.requests)
    return max(bisect.bisect_right(starts, start + 1.0) - i for i, start in enumerate(starts))


@pytest.mark.prefect
def test_a_prefect_rate_limit_holds_across_the_workers(
    dask_cluster: DaskCluster,
    prefect_server: PrefectServer,
    another_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Two workers, four requests in flight each: a limit of 1 slot decaying at 2/s holds them to
    at most 1 + 2 requests in any second, counted where the requests arrive."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.ingest import ingest as ingest_flow

    name = f"embed-rate-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=1, slot_decay_per_second=2.0)
    call(prefect_server, lambda client: client.create_global_concurrency_limit(create))
    kb = tmp_path / "kb"
    kb.mkdir()
    for page in sorted(RUST_BOOK.glob("ch0[4-6]*.md")):
        shutil.copy(page, kb / page.name)
    peaks: dict[str, int] = {}
    for limit in (None, name):
        with FakeEmbeddingsServer(dimensions=64, required_api_key=API_KEY) as server:
            for variable, value in {
                "DATABASE_URL": another_database(),
                "EMBEDDING_PROVIDER": "openai",
                "EMBEDDING_MODEL": "text-embedding-3-small",
                "EMBEDDING_DIMENSIONS": "64",
                "OPENAI_API_KEY": API_KEY,
                "OPENAI_BASE_URL": server.base_url,
                "RAGINGEST_EMBED_BATCH_INPUTS": "4",
                "RAGINGEST_SHARD_BYTES": "16384",
            }.items():
                monkeypatch.setenv(variable, value)
            if limit:
                monkeypatch.setenv("RAGINGEST_EMBED_RATE_LIMIT", limit)
            with api(prefect_server):
                summary = ingest_flow(source=str(kb), source_name="kb", cluster=dask_cluster.address)
            assert isinstance(summary, dict), summary
            assert summary["execution"]["workers"] == 2 and summary["execution"]["shards"] > 2
            assert server.request_count >= 20
            peaks[limit or "none"] = most_requests_in_a_second(server)

    assert peaks["none"] > 1 + 2
    assert peaks[name] <= 1 + 2
    used = call(prefect_server, lambda client: client.read_global_concurrency_limit_by_name(name))
    assert used.name == name
    assert worker_children(dask_cluster) == []


# --- a deployment run on the cluster -----------------------------------------------------------


@pytest.mark.prefect
def test_a_deployment_run_with_the_cluster_parameter_prepares_on_the_cluster(
    dask_cluster: DaskCluster, deployed: PrefectServer, database_url: str, tmp_path: Path
) -> None:
    parameters = {
        "source": str(RUST_BOOK),
        "source_name": "rust-book",
        "provider": "hash",
        "model": "test",
        "dimensions": 64,
        "cluster": dask_cluster.address,
    }
    flow_run_id = start_run(deployed, "bulk-load/bulk-load", parameters)
    log = tmp_path / "worker.log"
    env = deployed.env(DATABASE_URL=database_url, RAGINGEST_SHARD_BYTES=str(SHARD_BYTES))
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "ragingest", "--run-once"]
    with background(command, env, log) as worker:
        worker.wait(timeout=RUN_SECONDS)

    run = call(deployed, lambda client: client.read_flow_run(flow_run_id))
    assert run.state.is_completed(), f"{run.state}\n{tail(log)}"
    assert run.parameters["cluster"] == dask_cluster.address
    summary = table_values(run_artifacts(deployed, flow_run_id)["ingest-summary"])
    assert (summary["execution.runner"], summary["execution.workers"]) == ("dask", 2)
    assert summary["chunks.written"] == counts(database_url)[1] > 500
    assert worker_children(dask_cluster) == []


def test_the_cli_refuses_a_remote_cluster_with_the_embedded_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("RAGINGEST_DATABASE_URL", raising=False)
    monkeypatch.setenv("RAGINGEST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBEDDING_PROVIDER", "hash")
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.md").write_text("# A\n\ntext\n")

    code = main(["ingest", str(tmp_path / "kb"), "--no-prefect", "--cluster", "tcp://10.1.2.3:8786"])

    assert code == 1
    error = capsys.readouterr().err
    assert "tcp://10.1.2.3:8786" in error and "DATABASE_URL" in error
    assert not (tmp_path / "home").exists()


# --- a backfill's ranges on the cluster --------------------------------------------------------


def test_a_backfill_fills_its_id_ranges_on_the_cluster(dask_cluster: DaskCluster, database_url: str) -> None:
    from tasks.registry import register_model
    from tasks.runners import fill_range_here, fill_ranges_on_cluster
    from tasks.stage import stage_task

    ingest(make_settings(database_url, shard_bytes=SHARD_BYTES))
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        model = register_model(
            conn, provider="hash", model="second", dimensions=32, status="backfilling",
            precision=None, hnsw_m=16, hnsw_ef_construction=64,
        )  # fmt: skip
    settings = make_settings(database_url, dask_address=dask_cluster.address)
    task = stage_task("fill-range", fill_range_here)

    filled = fill_ranges_on_cluster(settings, model, task, batch_size=100, prefect=False, ranges=6)

    chunks = counts(database_url)[1]
    assert len(filled) > 1 and sum(stats.rows_filled for stats in filled) == chunks
    with psycopg.connect(database_url) as conn:
        missing = conn.execute(
            sql.SQL("SELECT count(*) FROM chunks WHERE {} IS NULL").format(sql.Identifier(model.column_name))
        ).fetchone()
    assert missing == (0,)


def test_ragingest_backfill_with_a_cluster_fills_the_whole_column(
    dask_cluster: DaskCluster, database_url: str, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    ingest(make_settings(database_url, shard_bytes=SHARD_BYTES))
    chunks = counts(database_url)[1]
    capsys.readouterr()
    arguments = ["backfill", "--provider", "hash", "--model", "second", "--dimensions", "32"]
    code = main(
        [*arguments, "--batch-size", "100", "--no-prefect", "--cluster", dask_cluster.address, "--json"]
    )

    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"]["filled"] == summary["rows"]["missing_at_start"] == chunks
    assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]
    assert "Receive client connection" in (dask_cluster.log_dir / "scheduler.log").read_text()
