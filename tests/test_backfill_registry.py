"""What a backfill registers: nothing on bad input, a retired model afresh, never a slug or column twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from flows.backfill import run_backfill
from flows.ingest import run_ingest
from tasks.backfill import activate, retire
from tasks.db import Connection, connect, index_validity
from tasks.embed import EmbeddingError, HashEmbedder
from tasks.registry import ModelConfigError, get_model, register_model
from tests.conftest import make_settings
from tests.embedders import CountingEmbedder
from tests.fake_openai import FakeEmbeddingsServer, Fault
from tests.test_ingest import PAGES, write_tree

NEW: dict[str, Any] = {"provider": "hash", "model": "test", "dimensions": 128}


@pytest.fixture
def loaded(database_url: str, tmp_path: Path) -> Any:
    """A small knowledge base ingested with the 64-dim hash model."""
    settings = make_settings(database_url)
    run_ingest(settings, write_tree(tmp_path / "kb", dict(PAGES)))
    return settings


def registry(conn: Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT slug, provider, model, dimensions, precision, status FROM embedding_models ORDER BY slug"
    ).fetchall()


def columns(conn: Connection) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'chunks'::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attname"
    ).fetchall()
    return [str(row[0]) for row in rows]


def counting() -> CountingEmbedder:
    return CountingEmbedder(HashEmbedder("test", 128))


BAD_REQUESTS = [
    pytest.param({**NEW, "batch_size": 0}, ModelConfigError, "batch size 0", id="batch-size-0"),
    pytest.param({**NEW, "batch_size": -5}, ModelConfigError, "batch size -5", id="batch-size-negative"),
    pytest.param({**NEW, "batch_size": 10_001}, ModelConfigError, "batch size 10001", id="batch-size-huge"),
    pytest.param({**NEW, "dimensions": 0}, ModelConfigError, "0 dimensions", id="dimensions-0"),
    pytest.param({**NEW, "dimensions": 4001}, ModelConfigError, "4001 dimensions", id="dimensions-4001"),
    pytest.param({**NEW, "precision": "float"}, ModelConfigError, "precision 'float'", id="precision"),
    pytest.param({**NEW, "provider": "nope"}, ModelConfigError, "provider 'nope'", id="provider"),
    pytest.param({**NEW, "model": " "}, ModelConfigError, "model name is empty", id="model-empty"),
    pytest.param(
        {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 64},
        EmbeddingError,
        "OPENAI_API_KEY is not set",
        id="openai-without-key",
    ),
]


@pytest.mark.parametrize(("request_", "error", "message"), BAD_REQUESTS)
def test_a_refused_backfill_registers_nothing_and_adds_no_column(
    loaded: Any, conn: Connection, request_: dict[str, Any], error: type[Exception], message: str
) -> None:
    before = (registry(conn), columns(conn))
    with pytest.raises(error, match=message):
        run_backfill(loaded, **request_)
    assert (registry(conn), columns(conn)) == before


def test_a_probe_the_api_refuses_registers_nothing(loaded: Any, conn: Connection) -> None:
    before = (registry(conn), columns(conn))
    with FakeEmbeddingsServer(dimensions=64) as server:
        server.script([Fault.unauthorized()])
        settings = make_settings(
            loaded.database_url.get_secret_value(), openai_api_key="sk-test", openai_base_url=server.base_url
        )
        with pytest.raises(EmbeddingError, match="401"):
            run_backfill(settings, provider="openai", model="text-embedding-3-small", dimensions=64)
    assert (registry(conn), columns(conn)) == before


def test_the_cli_refuses_batch_size_0_and_the_next_ingest_is_unharmed(
    env: None, database_url: str, conn: Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == 0
    before = (registry(conn), columns(conn))
    capsys.readouterr()

    args = ["backfill", "--provider", "hash", "--model", "test", "--dimensions", "128", "--batch-size", "0"]
    assert main([*args, "--no-prefect"]) == 1
    assert "batch size 0 is out of range: use 1 to 10,000 rows" in capsys.readouterr().err
    assert (registry(conn), columns(conn)) == before

    write_tree(kb, {"guides/new.md": "# New\n\nA page added after the refusal.\n"})
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == 0
    assert conn.execute("SELECT count(*) FROM chunks WHERE emb_test_64 IS NULL").fetchone() == (0,)


def test_a_retired_model_can_be_backfilled_again_from_its_cache(loaded: Any, conn: Connection) -> None:
    run_backfill(loaded, **NEW)
    retire(conn, "test_128")
    assert "emb_test_128" not in columns(conn)

    embedder = counting()
    summary = run_backfill(loaded, **NEW, embedder=embedder)

    assert summary["model"]["slug"] == "test_128" and summary["model"]["status"] == "ready"
    assert summary["rows"]["remaining"] == 0 and summary["index"] == {"built": True, "valid": True}
    assert summary["embeddings"]["embedded"] == 0 and summary["embeddings"]["cache_hits"] > 0
    assert embedder.texts == {"dimension probe": 1}  # every chunk came from the cache
    assert index_validity(conn)["chunks_emb_test_128_hnsw"] is True


def test_a_retired_model_comes_back_with_the_precision_now_asked_for(loaded: Any, conn: Connection) -> None:
    run_backfill(loaded, **NEW)
    retire(conn, "test_128")
    summary = run_backfill(loaded, **NEW, precision="halfvec")
    assert summary["model"]["precision"] == "halfvec" and summary["rows"]["remaining"] == 0
    column = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'chunks'::regclass AND attname = 'emb_test_128'"
    ).fetchone()
    assert column == ("halfvec(128)",)


def test_a_model_whose_slug_is_taken_gets_a_slug_of_its_own(loaded: Any, conn: Connection) -> None:
    before = conn.execute("SELECT id, emb_test_64::text FROM chunks ORDER BY id").fetchall()
    summary = run_backfill(loaded, provider="hash", model="TEST", dimensions=64)  # slug_for: test_64

    assert summary["model"]["slug"] == "test_64_2" and summary["model"]["column"] == "emb_test_64_2"
    assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]
    assert conn.execute("SELECT id, emb_test_64::text FROM chunks ORDER BY id").fetchall() == before
    assert [row[0] for row in registry(conn)] == ["test_64", "test_64_2"]


def test_a_stray_column_without_a_registry_row_is_never_adopted(loaded: Any, conn: Connection) -> None:
    conn.execute("ALTER TABLE chunks ADD COLUMN emb_test_128 vector(128)")
    stray = "[" + ",".join(["0.5"] * 128) + "]"
    conn.execute("UPDATE chunks SET emb_test_128 = %s::vector", (stray,))
    summary = run_backfill(loaded, **NEW)

    assert summary["model"]["column"] == "emb_test_128_2" and summary["rows"]["remaining"] == 0
    left = conn.execute("SELECT count(*) FROM chunks WHERE emb_test_128::text <> %s", (stray,)).fetchone()
    assert left == (0,)  # the stray column is left as it was, for a person to look at


def test_a_live_model_whose_column_went_missing_is_refilled_from_the_cache(
    loaded: Any, conn: Connection
) -> None:
    run_backfill(loaded, **NEW)
    conn.execute("ALTER TABLE chunks DROP COLUMN emb_test_128")

    embedder = counting()
    summary = run_backfill(loaded, **NEW, embedder=embedder)

    assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]
    assert embedder.texts == {"dimension probe": 1}


def test_a_column_of_another_type_than_the_registry_says_is_refused_before_spending(
    loaded: Any, conn: Connection
) -> None:
    run_backfill(loaded, **NEW)
    conn.execute("ALTER TABLE chunks DROP COLUMN emb_test_128")
    conn.execute("ALTER TABLE chunks ADD COLUMN emb_test_128 halfvec(128)")
    embedder = counting()
    with pytest.raises(ModelConfigError, match=r"chunks.emb_test_128 is halfvec\(128\).*vector\(128\)"):
        run_backfill(loaded, **NEW, embedder=embedder)
    assert embedder.calls == 0


def test_another_precision_for_a_registered_model_is_refused(loaded: Any, conn: Connection) -> None:
    run_backfill(loaded, **NEW)
    with pytest.raises(ModelConfigError, match="registered with precision vector, not halfvec"):
        run_backfill(loaded, **NEW, precision="halfvec")
    model = get_model(conn, "test_128")
    assert model is not None and model.precision == "vector"


def test_two_registrations_at_once_never_choose_the_same_slug(
    loaded: Any, conn: Connection, database_url: str
) -> None:
    results: list[str] = []

    def register_second() -> None:
        with connect(database_url) as other, other.transaction():
            results.append(
                register_model(other, provider="hash", model="TEST", dimensions=64, status="ready").slug
            )

    with connect(database_url) as first:
        with first.transaction():
            results.append(
                register_model(first, provider="hash", model="Test", dimensions=64, status="ready").slug
            )
            worker = threading.Thread(target=register_second)
            worker.start()
            deadline = time.monotonic() + 30
            while not waiting_for_an_advisory_lock(conn) and time.monotonic() < deadline:
                worker.join(0.05)
            assert waiting_for_an_advisory_lock(conn), "the second registration never queued"
        worker.join(30)

    assert results == ["test_64_2", "test_64_3"]


def waiting_for_an_advisory_lock(conn: Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
    return row is not None and row[0] > 0


def test_an_ingest_with_a_retired_model_points_at_the_backfill_that_brings_it_back(
    loaded: Any, conn: Connection, tmp_path: Path
) -> None:
    run_backfill(loaded, **NEW)
    activate(conn, "test_128")
    retire(conn, "test_64")
    kb = write_tree(tmp_path / "kb", {"guides/new.md": "# New\n\nA page added after the retirement.\n"})
    with pytest.raises(
        ModelConfigError, match="`ragingest backfill --provider hash --model test --dimensions 64`"
    ):
        run_ingest(loaded, kb)

    summary = run_backfill(loaded, provider="hash", model="test", dimensions=64)
    assert summary["model"]["status"] == "ready" and summary["embeddings"]["embedded"] == 0
    assert run_ingest(loaded, kb)["documents"]["failed"] == 0
    assert conn.execute("SELECT count(*) FROM chunks WHERE emb_test_64 IS NULL").fetchone() == (0,)


def test_long_names_that_share_a_prefix_get_distinct_slugs_within_the_limit(conn: Connection) -> None:
    prefix = "a-very-long-embedding-model-name-from-some-vendor-"
    with conn.transaction():
        first = register_model(conn, provider="hash", model=prefix + "one", dimensions=8, status="ready")
        second = register_model(conn, provider="hash", model=prefix + "two", dimensions=8, status="ready")

    assert first.slug != second.slug and max(len(first.slug), len(second.slug)) <= 44
    assert second.slug.endswith("_2") and {first.column_name, second.column_name} <= set(columns(conn))
