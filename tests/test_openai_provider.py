"""The openai provider through the real SDK against a loopback server that injects faults."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.embed import TerminalEmbeddingError
from tests.fake_openai import FakeEmbeddingsServer, Fault
from tests.fix_openai import loopback_settings
from tests.test_ingest import PAGES, chunk_rows, write_tree

API_KEY = "sk-test-do-not-leak-4f9c2a"


def openai_settings(database_url: str, server: FakeEmbeddingsServer, **overrides: Any) -> Any:
    patient = {"embed_timeout_seconds": 2.0, "embed_max_backoff_seconds": 2.0}
    return loopback_settings(database_url, server, API_KEY, **(patient | overrides))


def many_pages(root: Path, count: int) -> Path:
    return write_tree(
        root, {f"p{i:03}.md": f"# Page {i}\n\nThe body of page number {i}.\n" for i in range(count)}
    )


def test_vectors_come_from_the_api_and_batches_overlap(
    database_url: str, server: FakeEmbeddingsServer, tmp_path: Path, conn: Connection
) -> None:
    server.latency = 0.2
    root = many_pages(tmp_path / "kb", 40)
    settings = openai_settings(database_url, server, embed_batch_inputs=5, embed_concurrency=4)
    summary = run_ingest(settings, root)

    assert summary["embeddings"]["embedded"] == 40 and summary["embeddings"]["batches"] == 8
    assert server.request_count == 8 and server.max_concurrency >= 2
    records = server.requests
    assert any(a.overlaps(b) for i, a in enumerate(records) for b in records[i + 1 :])
    text, stored = conn.execute(
        "SELECT c.content, c.emb_text_embedding_3_small_64 FROM chunks c ORDER BY c.id LIMIT 1"
    ).fetchone()
    (embedded_text,) = [t for t in server.embedded_texts if t.endswith(text)]
    assert np.allclose(stored.to_numpy(), server.vector_for(embedded_text, 64), atol=1e-6)
    assert all(r.requested_dimensions == 64 for r in records)


def test_429_with_retry_after_is_honoured(
    database_url: str, server: FakeEmbeddingsServer, tmp_path: Path
) -> None:
    server.script([Fault.rate_limit(retry_after=0.4)])
    summary = run_ingest(openai_settings(database_url, server), write_tree(tmp_path / "kb", dict(PAGES)))

    first, second = server.requests[:2]
    assert (first.status, second.status) == (429, 200)
    assert second.started - first.finished >= 0.4
    assert summary["embeddings"]["retries"] == 1
    assert sum(server.embedded_texts.values()) == summary["embeddings"]["embedded"]


@pytest.mark.parametrize(
    "fault", [Fault.server_error(500), Fault.server_error(503), Fault.timeout(hold_seconds=5)]
)
def test_5xx_and_timeouts_are_retried(
    database_url: str, server: FakeEmbeddingsServer, tmp_path: Path, fault: Fault, conn: Connection
) -> None:
    server.script([fault])
    settings = openai_settings(database_url, server, embed_timeout_seconds=0.5)
    summary = run_ingest(settings, write_tree(tmp_path / "kb", dict(PAGES)))

    assert [r.fault for r in server.requests] == [fault.kind, None]
    assert summary["embeddings"]["retries"] == 1
    assert conn.execute(
        "SELECT count(*) FROM chunks WHERE emb_text_embedding_3_small_64 IS NULL"
    ).fetchone() == (0,)
    assert max(server.embedded_texts.values()) == 1  # nothing embedded twice


def test_wrong_dimensions_fail_before_any_write(
    database_url: str, server: FakeEmbeddingsServer, tmp_path: Path, conn: Connection
) -> None:
    server.script([Fault.wrong_dimensions(7)])
    with pytest.raises(TerminalEmbeddingError, match=r"\[7\] dimensions.*holds 64") as raised:
        run_ingest(openai_settings(database_url, server), write_tree(tmp_path / "kb", dict(PAGES)))

    assert raised.value.model_key == "openai:text-embedding-3-small:64"
    assert server.request_count == 1
    assert chunk_rows(conn) == []
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM embedding_cache").fetchone() == (0,)


@pytest.mark.parametrize("fault", [Fault.unauthorized(), Fault.bad_request()])
def test_terminal_errors_are_not_retried(
    database_url: str,
    server: FakeEmbeddingsServer,
    tmp_path: Path,
    fault: Fault,
    conn: Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.script([fault] * 10)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TerminalEmbeddingError, match=f"refused the request with {fault.status}") as raised:
        run_ingest(openai_settings(database_url, server), write_tree(tmp_path / "kb", dict(PAGES)))

    assert server.request_count == 1
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
    assert API_KEY not in str(raised.value) and API_KEY not in caplog.text


def test_paid_batches_survive_a_failed_run(
    database_url: str, server: FakeEmbeddingsServer, tmp_path: Path, conn: Connection
) -> None:
    root = many_pages(tmp_path / "kb", 12)
    settings = openai_settings(database_url, server, embed_batch_inputs=4, embed_concurrency=1)
    server.script([None, None, Fault.unauthorized()])
    with pytest.raises(TerminalEmbeddingError):
        run_ingest(settings, root)
    assert conn.execute("SELECT count(*) FROM embedding_cache").fetchone() == (8,)
    assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)

    server.reset_counters()
    summary = run_ingest(settings, root)
    assert server.texts_embedded == 4
    assert summary["embeddings"]["cache_hits"] == 8 and summary["chunks"]["written"] == 12
