"""Model migration: backfill a new column resumably, alongside ingests, then switch over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flows.backfill import run_backfill
from flows.ingest import run_ingest
from tasks.backfill import activate, retire
from tasks.db import Connection, index_validity
from tasks.embed import HashEmbedder, TerminalEmbeddingError, Vectors
from tasks.registry import InvalidIdentifier, ModelConfigError, get_model, validate_slug
from tasks.status import model_coverage
from tests.conftest import CORPORA, make_settings
from tests.embedders import CountingEmbedder
from tests.fake_openai import FakeEmbeddingsServer, Fault
from tests.test_ingest import PAGES, write_tree

NEW: dict[str, Any] = {"provider": "hash", "model": "test", "dimensions": 128}


def coverage(conn: Connection) -> dict[str, dict[str, Any]]:
    return {m["slug"]: m for m in model_coverage(conn)}


def unique_texts(conn: Connection) -> int:
    row = conn.execute("SELECT count(DISTINCT embed_hash) FROM chunks").fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def loaded(database_url: str, conn: Connection) -> Any:
    """The rust book ingested with the 64-dim hash model."""
    settings = make_settings(database_url)
    run_ingest(settings, CORPORA / "rust-book" / "src")
    return settings


def test_backfill_over_a_real_corpus_reaches_full_coverage_with_an_index(
    loaded: Any, conn: Connection
) -> None:
    summary = run_backfill(loaded, **NEW, batch_size=200)

    assert (
        summary["rows"]["remaining"] == 0 and summary["rows"]["filled"] == summary["rows"]["missing_at_start"]
    )
    assert summary["model"]["status"] == "ready" and summary["index"] == {"built": True, "valid": True}
    models = coverage(conn)
    assert models["test_128"]["coverage"] == 1.0 and models["test_128"]["index_valid"]
    assert models["test_64"]["status"] == "active"  # nothing switches until asked
    assert summary["embeddings"]["embedded"] == unique_texts(conn)


class FailingAfter(CountingEmbedder):
    """Answers `calls_before_failure` requests, then fails like a crashed worker would."""

    def __init__(self, calls_before_failure: int) -> None:
        super().__init__(HashEmbedder("test", 128))
        self.calls_before_failure = calls_before_failure

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if self.calls >= self.calls_before_failure + 1:  # +1: the dimension probe
            raise RuntimeError("worker died")
        return await super().embed(texts)


def test_a_backfill_stopped_midway_resumes_and_embeds_only_the_rest(loaded: Any, conn: Connection) -> None:
    settings = make_settings(
        loaded.database_url.get_secret_value(), embed_batch_inputs=50, embed_concurrency=1
    )
    crashing = FailingAfter(calls_before_failure=4)
    with pytest.raises(RuntimeError, match="worker died"):
        run_backfill(settings, **NEW, batch_size=100, embedder=crashing)
    done_before = crashing.embedded - 1  # minus the probe
    assert 0 < done_before < unique_texts(conn)

    counting = CountingEmbedder(HashEmbedder("test", 128))
    summary = run_backfill(settings, **NEW, batch_size=100, embedder=counting)

    assert counting.embedded - 1 == unique_texts(conn) - done_before  # re-embeds 0 rows already done
    assert not set(counting.texts) & set(crashing.texts) - {"dimension probe"}
    assert summary["rows"]["remaining"] == 0 and coverage(conn)["test_128"]["coverage"] == 1.0


def test_kill_9_during_a_backfill_then_rerun_reembeds_nothing_already_paid_for(
    loaded: Any, conn: Connection, tmp_path: Path
) -> None:
    url = loaded.database_url.get_secret_value()
    with FakeEmbeddingsServer(dimensions=128, latency=0.05) as server:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.base_url,
            "EMBEDDING_PROVIDER": "hash",
            "EMBEDDING_MODEL": "test",
            "EMBEDDING_DIMENSIONS": "64",
            "RAGINGEST_EMBED_BATCH_INPUTS": "20",
            "RAGINGEST_EMBED_CONCURRENCY": "2",
        }
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "backfill",
            "--provider",
            "openai",
            "--model",
            "text-embedding-3-small",
            "--dimensions",
            "128",
            "--batch-size",
            "100",
            "--no-prefect",
        ]
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            command, env=env, cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while server.texts_embedded < 150 and time.monotonic() < deadline and worker.poll() is None:
                server.wait_for_in_flight(1, timeout=0.5)
            worker.send_signal(signal.SIGKILL)
        finally:
            worker.wait(timeout=30)
        assert server.texts_embedded >= 150, (tmp_path / "worker.log").read_text()
        paid = conn.execute(
            "SELECT count(*) FROM embedding_cache WHERE model_key = 'openai:text-embedding-3-small:128'"
        ).fetchone()
        assert paid is not None and 0 < paid[0] < unique_texts(conn)

        server.reset_counters()
        settings = make_settings(
            url, openai_api_key="sk-test", openai_base_url=server.base_url, embed_batch_inputs=20
        )
        summary = run_backfill(settings, provider="openai", model="text-embedding-3-small", dimensions=128)

        assert server.texts_embedded - 1 == unique_texts(conn) - paid[0]  # -1: the dimension probe
        assert summary["rows"]["remaining"] == 0
        assert index_validity(conn)["chunks_emb_text_embedding_3_small_128_hnsw"] is True


class GatedEmbedder(CountingEmbedder):
    """Holds its first real batch until the test lets it go, so an ingest runs mid-backfill."""

    def __init__(self, gate: threading.Event, started: threading.Event) -> None:
        super().__init__(HashEmbedder("test", 128))
        self.gate, self.started = gate, started

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if self.calls == 1:
            self.started.set()
            await asyncio_wait(self.gate)
        return await super().embed(texts)


async def asyncio_wait(event: threading.Event) -> None:
    import asyncio

    assert await asyncio.to_thread(event.wait, 30), "the test never opened the gate"


def test_an_ingest_during_a_backfill_leaves_both_columns_complete(
    database_url: str, conn: Connection, tmp_path: Path
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    settings = make_settings(database_url)
    run_ingest(settings, kb)
    gate, started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def backfill() -> None:
        try:
            run_backfill(settings, **NEW, batch_size=2, embedder=GatedEmbedder(gate, started))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=backfill)
    worker.start()
    assert started.wait(30)
    write_tree(kb, {"guides/new.md": "# New\n\nA page added mid-backfill.\n\n## More\n\nAnother section.\n"})
    page = kb / "guides/deploy.md"
    page.write_text(page.read_text() + "\n## Canary\n\nShip to one percent first.\n")
    summary = run_ingest(settings, kb)
    gate.set()
    worker.join(60)

    assert errors == [] and summary["documents"]["new"] == 1 and summary["documents"]["changed"] == 1
    nulls = conn.execute(
        "SELECT count(*) FILTER (WHERE emb_test_64 IS NULL), count(*) FILTER"
        " (WHERE emb_test_128 IS NULL) FROM chunks"
    ).fetchone()
    assert nulls == (0, 0)
    duplicates = conn.execute(
        "SELECT count(*) - count(DISTINCT (document_id, ordinal)) FROM chunks"
    ).fetchone()
    assert duplicates == (0,)
    assert coverage(conn)["test_128"]["index_valid"]


def test_activation_switches_the_primary_and_retirement_drops_the_column(
    loaded: Any, conn: Connection
) -> None:
    run_backfill(loaded, **NEW)
    activate(conn, "test_128")
    assert {m["slug"]: m["status"] for m in coverage(conn).values()} == {
        "test_64": "ready",
        "test_128": "active",
    }

    with pytest.raises(ModelConfigError, match="primary"):
        retire(conn, "test_128")
    retire(conn, "test_64")
    columns = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'chunks'"
        )
    }
    assert "emb_test_64" not in columns and "emb_test_128" in columns
    assert "chunks_emb_test_64_hnsw" not in index_validity(conn)
    retired = get_model(conn, "test_64")
    assert retired is not None and retired.status == "retired"
    # An ingest now writes only the live column, and must be configured for it.
    assert (
        run_ingest(
            make_settings(loaded.database_url.get_secret_value(), embedding_dimensions=128),
            CORPORA / "rust-book" / "src",
        )["chunks"]["written"]
        == 0
    )


def test_activation_refuses_an_incomplete_model_unless_forced(loaded: Any, conn: Connection) -> None:
    settings = make_settings(loaded.database_url.get_secret_value(), embed_batch_inputs=50)
    with pytest.raises(RuntimeError):
        run_backfill(settings, **NEW, batch_size=100, embedder=FailingAfter(2))
    with pytest.raises(ModelConfigError, match="not complete"):
        activate(conn, "test_128")
    assert activate(conn, "test_128", force=True).status == "active"


@pytest.mark.parametrize(
    "slug", ["x; DROP TABLE chunks", 'emb_x" --', "Robert'); DROP TABLE documents;--", "../etc", "", "a" * 60]
)
def test_hostile_slugs_are_refused(slug: str, conn: Connection) -> None:
    with pytest.raises(InvalidIdentifier):
        validate_slug(slug)
    with pytest.raises(InvalidIdentifier):
        activate(conn, slug)
    assert conn.execute(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('chunks', 'documents')"
    ).fetchone() == (2,)


def test_a_dimension_mismatch_fails_before_any_write(loaded: Any, conn: Connection) -> None:
    with FakeEmbeddingsServer(dimensions=128) as server:
        server.script([Fault.wrong_dimensions(100)])
        settings = make_settings(
            loaded.database_url.get_secret_value(), openai_api_key="sk-test", openai_base_url=server.base_url
        )
        with pytest.raises(TerminalEmbeddingError, match=r"\[100\] dimensions, but the column holds 128"):
            run_backfill(settings, provider="openai", model="text-embedding-3-small", dimensions=128)
    assert [m["slug"] for m in model_coverage(conn)] == ["test_64"]
    columns = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'chunks'"
        )
    }
    assert not any(c.startswith("emb_text_embedding") for c in columns)


def test_dry_run_counts_rows_and_tokens_and_spends_nothing(loaded: Any, conn: Connection) -> None:
    settings = make_settings(loaded.database_url.get_secret_value(), cost_per_million_tokens=0.02)
    summary = run_backfill(settings, **NEW, dry_run=True)
    total = conn.execute("SELECT count(*), sum(token_count) FROM chunks").fetchone()
    assert total is not None
    assert summary["rows"]["to_fill"] == total[0]
    assert summary["embeddings"]["tokens"] == total[1]
    assert summary["embeddings"]["estimated_cost_usd"] == pytest.approx(total[1] * 0.02 / 1e6, abs=1e-6)
    assert [m["slug"] for m in model_coverage(conn)] == ["test_64"]


def test_above_2000_dimensions_halfvec_is_chosen_and_vector_is_refused(loaded: Any, conn: Connection) -> None:
    with pytest.raises(ModelConfigError, match="halfvec"):
        run_backfill(loaded, provider="hash", model="big", dimensions=3072, precision="vector")
    summary = run_backfill(loaded, provider="hash", model="big", dimensions=3072)
    assert summary["model"]["precision"] == "halfvec" and summary["index"]["valid"]
    column_type = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'chunks'::regclass AND attname = 'emb_big_3072'"
    ).fetchone()
    assert column_type == ("halfvec(3072)",)
