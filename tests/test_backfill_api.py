"""A backfill through the real openai SDK against the loopback server: budgets, 429s, lies, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flows.backfill import run_backfill
from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.embed import TerminalEmbeddingError
from tasks.registry import get_model
from tests.conftest import make_settings
from tests.fake_openai import FakeEmbeddingsServer, Fault
from tests.fix_openai import loopback_settings
from tests.test_ingest import write_tree

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-backfill-test"
MODEL = "text-embedding-3-small"
MODEL_KEY = f"openai:{MODEL}:64"
COLUMN = "emb_text_embedding_3_small_64"
PAGE_COUNT = 64
EVENT_LOOP_NOISE = ("Event loop is closed", "Task exception was never retrieved", "different event loop")


@pytest.fixture
def loaded(database_url: str, tmp_path: Path) -> str:
    """Many one-chunk pages, ingested with the 64-dim hash model."""
    pages = {f"p{i:03}.md": f"# Page {i}\n\nThe body of page number {i}.\n" for i in range(PAGE_COUNT)}
    run_ingest(make_settings(database_url), write_tree(tmp_path / "kb", dict(pages)))
    return database_url


def api_settings(database_url: str, server: FakeEmbeddingsServer, **overrides: Any) -> Any:
    patient = {"embed_timeout_seconds": 5.0, "embed_max_backoff_seconds": 0.2}
    hash_model = {"embedding_provider": "hash", "embedding_model": "test", "embedding_dimensions": 64}
    return loopback_settings(database_url, server, API_KEY, **(hash_model | patient | overrides))


def backfill_command(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.main",
        "--profile",
        "prod",
        "backfill",
        "--provider",
        "openai",
        "--model",
        MODEL,
        "--dimensions",
        "64",
        "--no-prefect",
        *extra,
    ]


def cli_env(database_url: str, server: FakeEmbeddingsServer, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": server.base_url,
        "RAGINGEST_EMBED_TIMEOUT_SECONDS": "5",
        "RAGINGEST_EMBED_MAX_BACKOFF_SECONDS": "0.2",
        **extra,
    }


def chunk_tokens(conn: Connection) -> tuple[int, int]:
    row = conn.execute("SELECT count(*), sum(token_count) FROM chunks").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_a_prod_backfill_under_a_dry_token_budget_and_429s_completes_without_loop_noise(
    loaded: str, conn: Connection, server: FakeEmbeddingsServer
) -> None:
    rows, tokens = chunk_tokens(conn)
    tokens_per_minute = int(tokens * 0.9)  # the budget runs dry for the last tenth of the fill
    server.random_faults(0.2, seed=7406, kinds=["rate_limit"], retry_after=0.05)
    env = cli_env(
        loaded,
        server,
        RAGINGEST_TOKENS_PER_MINUTE=str(tokens_per_minute),
        RAGINGEST_EMBED_BATCH_INPUTS="1",
    )
    done = subprocess.run(
        backfill_command("--batch-size", "4", "--json"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert done.returncode == 0, done.stderr
    assert not [noise for noise in EVENT_LOOP_NOISE if noise in done.stderr + done.stdout], done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows"] == {"missing_at_start": rows, "filled": rows, "remaining": 0}
    assert summary["embeddings"]["retries"] >= 1
    statuses = [r.status for r in server.requests]
    assert statuses.count(429) >= 1 and statuses.count(200) == rows + 1  # +1: the dimension probe
    first, last = server.requests[0], server.requests[-1]
    dry_seconds = (tokens - tokens_per_minute) * 60 / tokens_per_minute
    assert last.started - first.started >= 0.9 * dry_seconds  # the budget held the requests back


def test_a_429_on_the_dimension_probe_is_retried_like_any_batch(
    loaded: str, conn: Connection, server: FakeEmbeddingsServer
) -> None:
    server.script([Fault.rate_limit(retry_after=0.05), Fault.server_error(503)])
    summary = run_backfill(api_settings(loaded, server), provider="openai", model=MODEL, dimensions=64)

    probes = [r for r in server.requests[:3] if r.inputs == ("dimension probe",)]
    assert [r.status for r in probes] == [429, 503, 200]
    assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]


def test_a_probe_that_never_gets_through_registers_nothing(
    loaded: str, conn: Connection, server: FakeEmbeddingsServer
) -> None:
    server.script([Fault.rate_limit(retry_after=0.01)] * 3)
    settings = api_settings(loaded, server, embed_max_attempts=3)
    with pytest.raises(Exception, match="429"):
        run_backfill(settings, provider="openai", model=MODEL, dimensions=64)

    assert server.request_count == 3
    assert [row[0] for row in conn.execute("SELECT slug FROM embedding_models")] == ["test_64"]


def test_a_server_that_lies_about_dimensions_midway_caches_nothing_wrong_and_a_rerun_completes(
    loaded: str, conn: Connection, server: FakeEmbeddingsServer
) -> None:
    settings = api_settings(loaded, server, embed_batch_inputs=8, embed_concurrency=1)
    server.script([None, None, Fault.wrong_dimensions(100)])  # the probe and the first request pass
    with pytest.raises(TerminalEmbeddingError, match=r"\[100\] dimensions"):
        run_backfill(settings, provider="openai", model=MODEL, dimensions=64, batch_size=16)

    cached = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE vector_dims(embedding) <> 64) FROM embedding_cache"
        " WHERE model_key = %s",
        (MODEL_KEY,),
    ).fetchone()
    assert cached == (8, 0)
    filled = conn.execute(f"SELECT count({COLUMN}) FROM chunks").fetchone()
    assert filled == (0,)  # the batch with the lie was never written
    model = get_model(conn, "text_embedding_3_small_64")
    assert model is not None and model.status == "backfilling"

    server.reset_counters()
    summary = run_backfill(settings, provider="openai", model=MODEL, dimensions=64, batch_size=16)
    assert summary["rows"]["remaining"] == 0 and summary["embeddings"]["cache_hits"] == 8
    assert server.texts_embedded == PAGE_COUNT - 8 + 1  # +1: the probe


def test_sigterm_mid_backfill_loses_nothing_paid_for_and_a_rerun_finishes(
    loaded: str, conn: Connection, server: FakeEmbeddingsServer, tmp_path: Path
) -> None:
    server.latency = 0.05
    log = tmp_path / "worker.log"
    env = cli_env(loaded, server, RAGINGEST_EMBED_BATCH_INPUTS="4", RAGINGEST_EMBED_CONCURRENCY="1")
    with log.open("wb") as out:
        worker = subprocess.Popen(
            backfill_command("--batch-size", "8"), env=env, cwd=ROOT, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 60
            while server.texts_embedded < 20 and time.monotonic() < deadline and worker.poll() is None:
                server.wait_for_in_flight(1, timeout=0.5)
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert server.texts_embedded >= 20 and code != 0, log.read_text()
    paid = conn.execute("SELECT count(*) FROM embedding_cache WHERE model_key = %s", (MODEL_KEY,)).fetchone()
    assert paid is not None and 0 < paid[0] < PAGE_COUNT

    server.reset_counters()
    summary = run_backfill(
        api_settings(loaded, server), provider="openai", model=MODEL, dimensions=64, batch_size=8
    )
    assert summary["rows"]["remaining"] == 0 and summary["model"]["status"] == "ready"
    assert server.texts_embedded == PAGE_COUNT - paid[0] + 1  # +1: the probe
