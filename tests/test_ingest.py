"""The ingest pipeline end to end against the real Postgres, with embedders that count."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flows.ingest import run_ingest
from tasks.db import Connection, connect, index_validity, verify_schema
from tasks.load import RunLocked, acquire_load_lock, release_load_lock
from tests.conftest import corpus_root, make_settings
from tests.embedders import CountingFactory

PAGES = {
    "guides/install.md": "---\ntitle: Installing\ntags: [setup, linux]\n---\n# Installing\n\n"
    "Run the installer.\n\n## On Linux\n\nUse the package manager to install the tool.\n\n"
    "## On macOS\n\nUse Homebrew to install it.\n",
    "guides/deploy.md": "# Deploying\n\nShip the build to production with the deploy command.\n\n"
    "## Rollback\n\nRevert with the rollback command when a release goes wrong.\n",
    "reference/cli.md": "---\ntitle: CLI reference\nrag_namespace: ref\n---\n## ingest\n\nSyncs a folder.\n\n"
    "## status\n\nShows coverage.\n",
    "notes/private.md": "---\nrag_include: false\n---\n# Private\n\nNot for the index.\n",
    "README.md": "# Knowledge base\n\nThe root page of the knowledge base.\n",
}


def write_tree(root: Path, pages: dict[str, str | bytes]) -> Path:
    for rel, content in pages.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture
def kb(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "kb", dict(PAGES))


def ingest(
    settings: Any, root: Path, factory: CountingFactory | None = None, **kwargs: Any
) -> dict[str, Any]:
    return run_ingest(settings, root, embedder_factory=factory or CountingFactory(), **kwargs)


def chunk_rows(conn: Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT d.path, c.ordinal, c.heading_path, c.content FROM chunks c"
        " JOIN documents d ON d.id = c.document_id ORDER BY d.path, c.ordinal"
    ).fetchall()


def test_first_run_loads_every_page_with_vectors_and_index(settings: Any, kb: Path, conn: Connection) -> None:
    factory = CountingFactory()
    summary = ingest(settings, kb, factory)

    assert summary["documents"] == {
        "seen": 5,
        "new": 4,
        "changed": 0,
        "unchanged": 0,
        "deleted": 0,
        "failed": 0,
        "excluded": 1,
    }
    paths = {row[0] for row in conn.execute("SELECT path FROM documents")}
    assert paths == {"guides/install.md", "guides/deploy.md", "reference/cli.md", "README.md"}
    rows = chunk_rows(conn)
    assert summary["chunks"]["written"] == len(rows) == summary["chunks"]["total"]
    assert (
        "guides/install.md",
        1,
        ["Installing", "On Linux"],
        "Use the package manager to install the tool.",
    ) in rows
    missing = conn.execute("SELECT count(*) FROM chunks WHERE emb_test_64 IS NULL").fetchone()
    assert missing == (0,)
    assert factory.embedded == summary["embeddings"]["embedded"] == summary["embeddings"]["cache_misses"]
    assert index_validity(conn)["chunks_emb_test_64_hnsw"] is True
    assert verify_schema(conn) == []
    namespaces = dict(conn.execute("SELECT path, namespace FROM documents").fetchall())
    assert namespaces["reference/cli.md"] == "ref" and namespaces["guides/deploy.md"] == "guides"


def test_rerun_without_changes_embeds_and_writes_nothing(settings: Any, kb: Path) -> None:
    ingest(settings, kb)
    factory = CountingFactory()
    summary = ingest(settings, kb, factory)

    assert factory.embedded == 0
    assert summary["embeddings"]["embedded"] == 0
    assert summary["chunks"]["written"] == 0 and summary["chunks"]["deleted"] == 0
    assert summary["documents"]["unchanged"] == 4


def test_edit_embeds_only_the_changed_chunks(settings: Any, kb: Path, conn: Connection) -> None:
    ingest(settings, kb)
    before = {row[:2]: row[3] for row in chunk_rows(conn)}
    page = kb / "guides/install.md"
    page.write_text(page.read_text().replace("Use Homebrew to install it.", "Use Homebrew or MacPorts."))

    factory = CountingFactory()
    summary = ingest(settings, kb, factory)

    (embedder,) = factory.embedders.values()
    assert len(embedder.texts) == 1
    (text,) = embedder.texts
    assert "MacPorts" in text and "On macOS" in text
    assert summary["documents"]["changed"] == 1 and summary["documents"]["unchanged"] == 3
    after = {row[:2]: row[3] for row in chunk_rows(conn)}
    assert after[("guides/install.md", 2)] == "Use Homebrew or MacPorts."
    assert {k: v for k, v in after.items() if k[0] != "guides/install.md"} == {
        k: v for k, v in before.items() if k[0] != "guides/install.md"
    }


def test_deleted_file_loses_its_document_and_chunks(settings: Any, kb: Path, conn: Connection) -> None:
    ingest(settings, kb)
    (kb / "guides/deploy.md").unlink()
    summary = ingest(settings, kb)

    assert summary["documents"]["deleted"] == 1
    assert summary["chunks"]["deleted"] == 2
    assert all(row[0] != "guides/deploy.md" for row in chunk_rows(conn))
    assert conn.execute("SELECT count(*) FROM documents WHERE path = 'guides/deploy.md'").fetchone() == (0,)


def test_renamed_file_is_not_embedded_again(settings: Any, kb: Path, conn: Connection) -> None:
    ingest(settings, kb)
    (kb / "guides/install.md").rename(kb / "guides/installation.md")
    factory = CountingFactory()
    summary = ingest(settings, kb, factory)

    assert factory.embedded == 0
    assert summary["embeddings"]["cache_hits"] == 3
    assert summary["documents"]["new"] == 1 and summary["documents"]["deleted"] == 1
    assert {row[0] for row in chunk_rows(conn)} >= {"guides/installation.md"}


def test_page_that_turns_rag_include_false_is_removed(settings: Any, kb: Path, conn: Connection) -> None:
    ingest(settings, kb)
    page = kb / "README.md"
    page.write_text("---\nrag_include: false\n---\n" + page.read_text())
    summary = ingest(settings, kb)

    assert summary["documents"]["deleted"] == 1
    assert conn.execute("SELECT count(*) FROM documents WHERE path = 'README.md'").fetchone() == (0,)


def test_bad_files_are_reported_by_name_and_the_rest_ingest(
    settings: Any, kb: Path, conn: Connection
) -> None:
    write_tree(
        kb,
        {
            "bad/latin1.md": "caf\xe9 au lait".encode("latin-1"),
            "bad/binary.md": b"# x\n\x00\x01\x02",
            "bad/yaml.md": "---\ntitle: [unclosed\n---\n# Body\n\ntext\n",
            "odd/crlf.md": b"# Windows\r\n\r\nLine endings.\r\n",
            "odd/bom.md": "\ufeff# Bom\n\nStarts with a BOM.\n".encode(),
            "odd/empty.md": "",
            "odd/frontmatter-only.md": "---\ntitle: nothing\n---\n",
        },
    )
    (kb / "dir.md").mkdir()
    summary = ingest(make_settings(settings.database_url.get_secret_value(), max_file_bytes=10_000), kb)

    failed = {f["path"]: f["reason"] for f in summary["failures"]}
    assert set(failed) == {"bad/latin1.md", "bad/binary.md", "bad/yaml.md"}
    assert "UTF-8" in failed["bad/latin1.md"]
    assert "NUL" in failed["bad/binary.md"]
    assert "YAML" in failed["bad/yaml.md"]
    rows = chunk_rows(conn)
    assert ("odd/crlf.md", 0, ["Windows"], "Line endings.") in rows
    assert ("odd/bom.md", 0, ["Bom"], "Starts with a BOM.") in rows
    assert not [r for r in rows if r[0] in {"odd/empty.md", "odd/frontmatter-only.md"}]
    assert summary["documents"]["failed"] == 3


def test_a_page_that_breaks_keeps_its_old_chunks_and_turns_stale(
    settings: Any, kb: Path, conn: Connection
) -> None:
    ingest(settings, kb)
    before = [r for r in chunk_rows(conn) if r[0] == "guides/deploy.md"]
    (kb / "guides/deploy.md").write_bytes(b"\xff\xfe broken")
    summary = ingest(settings, kb)

    assert [f["path"] for f in summary["failures"]] == ["guides/deploy.md"]
    assert [r for r in chunk_rows(conn) if r[0] == "guides/deploy.md"] == before
    status = conn.execute("SELECT status FROM documents WHERE path = 'guides/deploy.md'").fetchone()
    assert status == ("stale",)

    (kb / "guides/deploy.md").write_text(PAGES["guides/deploy.md"])
    ingest(settings, kb)
    status = conn.execute("SELECT status FROM documents WHERE path = 'guides/deploy.md'").fetchone()
    assert status == ("active",)


def test_drop_strategy_rebuilds_the_index_in_the_same_transaction(
    database_url: str, kb: Path, conn: Connection
) -> None:
    summary = ingest(make_settings(database_url, index_strategy="drop"), kb)

    assert summary["index"]["dropped"] == 1 and summary["index"]["rebuilt"] == 1
    assert index_validity(conn)["chunks_emb_test_64_hnsw"] is True


def test_a_fault_inside_the_load_leaves_tables_and_index_as_they_were(
    database_url: str, kb: Path, conn: Connection
) -> None:
    settings = make_settings(database_url, index_strategy="drop")
    ingest(settings, kb)
    before = chunk_rows(conn)
    docs_before = conn.execute("SELECT path, content_hash FROM documents ORDER BY path").fetchall()
    # A real server-side fault: a trigger that fails part-way through the chunk insert,
    # after the index was dropped and the documents upserted.
    conn.execute(
        "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'injected fault'; END$$"
    )
    conn.execute(
        "CREATE TRIGGER fail_insert BEFORE INSERT ON chunks FOR EACH ROW"
        " WHEN (NEW.content LIKE '%%MacPorts%%') EXECUTE FUNCTION fail_insert()"
    )
    page = kb / "guides/install.md"
    page.write_text(page.read_text().replace("Use Homebrew to install it.", "Use Homebrew or MacPorts."))
    (kb / "guides/new.md").write_text("# New\n\nA new page.\n")
    (kb / "guides/deploy.md").unlink()

    with pytest.raises(psycopg.errors.RaiseException, match="injected fault"):
        ingest(settings, kb)

    assert chunk_rows(conn) == before
    assert conn.execute("SELECT path, content_hash FROM documents ORDER BY path").fetchall() == docs_before
    assert index_validity(conn)["chunks_emb_test_64_hnsw"] is True
    # The vectors that were paid for are kept: the rerun embeds nothing again.
    conn.execute("DROP TRIGGER fail_insert ON chunks")
    factory = CountingFactory()
    summary = ingest(settings, kb, factory)
    assert factory.embedded == 0 and summary["chunks"]["written"] > 0


def test_second_run_waits_for_the_lock_then_fails_with_a_clear_message(
    database_url: str, settings: Any, kb: Path
) -> None:
    holder = connect(database_url)
    acquire_load_lock(holder, 1)
    try:
        impatient = make_settings(database_url, lock_timeout_seconds=0.2)
        with pytest.raises(RunLocked, match="another ingest or backfill"):
            ingest(impatient, kb)
    finally:
        release_load_lock(holder)
        holder.close()
    assert ingest(settings, kb)["documents"]["new"] == 4


def test_two_concurrent_runs_leave_no_duplicates(database_url: str, kb: Path, conn: Connection) -> None:
    settings = make_settings(database_url, lock_timeout_seconds=60)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ingest(settings, kb)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    duplicates = conn.execute(
        "SELECT count(*) FROM (SELECT document_id, ordinal FROM chunks GROUP BY 1, 2 HAVING count(*) > 1) d"
    ).fetchone()
    assert duplicates == (0,)
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (4,)


def test_tokens_chunker_windows_with_overlap(database_url: str, tmp_path: Path, conn: Connection) -> None:
    words = " ".join(f"word{i}" for i in range(3000))
    root = write_tree(tmp_path / "kb", {"long.md": f"# Long\n\n{words}\n"})
    summary = ingest(make_settings(database_url, chunker="tokens", token_window=200, token_overlap=20), root)

    counts = [r[0] for r in conn.execute("SELECT token_count FROM chunks ORDER BY ordinal")]
    assert summary["chunks"]["written"] == len(counts) > 5
    assert max(counts) <= 200


@pytest.mark.corpus
@pytest.mark.parametrize("corpus", ["rust-book/src", "prefect-docs/docs"])
def test_real_corpus_ingests_and_reruns_for_free(
    database_url: str, tmp_path: Path, corpus: str, conn: Connection
) -> None:
    root = corpus_root(corpus)
    settings = make_settings(database_url)
    first = ingest(settings, root)
    files = sum(1 for p in root.rglob("*") if p.suffix in {".md", ".mdx", ".markdown"} and p.is_file())

    assert first["documents"]["seen"] == files
    assert first["documents"]["new"] + first["documents"]["failed"] + first["documents"]["excluded"] == files
    assert first["chunks"]["written"] == first["chunks"]["total"] > files
    assert conn.execute("SELECT count(*) FROM chunks WHERE emb_test_64 IS NULL").fetchone() == (0,)
    over_cap = conn.execute("SELECT count(*) FROM chunks WHERE token_count > 512").fetchone()
    assert over_cap == (0,)

    second = ingest(settings, root)
    assert second["embeddings"]["embedded"] == 0
    assert second["chunks"]["written"] == 0
    assert second["documents"]["unchanged"] == first["documents"]["new"]
