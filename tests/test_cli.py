"""The command line, in-process: exit codes, one JSON object on stdout, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import EXIT_FAILED, EXIT_FILE_FAILURES, EXIT_TERMINATED, EXIT_USAGE, main
from tests.test_ingest import PAGES, write_tree


def test_ingest_json_prints_exactly_one_object_with_the_documented_fields(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)

    assert set(summary["documents"]) >= {"seen", "new", "changed", "unchanged", "deleted", "failed"}
    assert set(summary["chunks"]) >= {"written", "deleted", "total"}
    assert set(summary["embeddings"]) >= {"cache_hits", "cache_misses", "embedded", "tokens", "truncated"}
    assert set(summary["index"]) >= {"strategy", "dropped", "rebuilt"}
    assert set(summary["seconds"]) >= {
        "discover",
        "chunk",
        "cache",
        "embed",
        "load",
        "index",
        "vacuum",
        "total",
    }
    assert summary["failures"] == []
    assert summary["documents"]["new"] == 4


def test_status_reports_each_model_column(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    main(["ingest", str(kb), "--no-prefect", "--json"])
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)

    (model,) = status["models"]
    assert model["model_key"] == "hash:test:64" and model["dimensions"] == 64
    assert model["missing"] == 0 and model["embedded"] == status["chunks"] > 0
    assert model["index_present"] is True
    assert status["documents"] == {"active": 4, "stale": 0}


def test_db_migrate_is_idempotent_and_verify_names_what_is_missing(
    env: None, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "migrate"]) == 0
    assert "applied 0 migration(s)" in capsys.readouterr().out
    assert main(["db", "verify"]) == 0
    assert "schema ok" in capsys.readouterr().out

    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX chunks_tsv_gin")
        conn.execute("ALTER TABLE documents DROP COLUMN tags")
    assert main(["db", "verify"]) == 1
    out = capsys.readouterr().out
    assert "index chunks_tsv_gin is missing" in out
    assert "column documents.tags is missing" in out


def test_errors_become_one_readable_line(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ingest", str(tmp_path / "nope"), "--no-prefect"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_model_change_on_a_loaded_database_points_to_backfill(
    env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    main(["ingest", str(kb), "--no-prefect", "--json"])
    capsys.readouterr()
    monkeypatch.setenv("EMBEDDING_DIMENSIONS", "128")
    assert main(["ingest", str(kb), "--no-prefect"]) == 1
    err = capsys.readouterr().err
    assert "hash:test:128 is not registered" in err and "ragingest backfill" in err


BAD_BYTES = b"# Broken\n\n\xff\xfe not UTF-8\n"


def test_a_run_with_failed_files_exits_3_and_lists_them(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", {**PAGES, "broken.md": BAD_BYTES})
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == EXIT_FILE_FAILURES
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"]["new"] == 4 and summary["documents"]["failed"] == 1
    assert [f["path"] for f in summary["failures"]] == ["broken.md"]


def test_a_run_where_every_file_failed_is_never_a_success(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", {f"broken-{i}.md": BAD_BYTES for i in range(3)})
    assert main(["ingest", str(kb), "--no-prefect", "--json"]) == EXIT_FILE_FAILURES
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"]["failed"] == 3 and summary["documents"]["new"] == 0
    assert main(["ingest", str(kb), "--no-prefect"]) == EXIT_FILE_FAILURES  # a rerun too
    assert "broken-0.md" in capsys.readouterr().out


def test_the_exit_codes_are_the_documented_ones() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    using_it = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    for code in (EXIT_FILE_FAILURES, EXIT_FAILED, EXIT_USAGE, EXIT_TERMINATED):
        assert f"`{code}`" in using_it, code


def test_sigterm_raises_terminated_once_and_then_lets_the_cleanup_finish() -> None:
    import os
    import signal

    from cli.main import Terminated, sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises():
        pass
    assert signal.getsignal(signal.SIGTERM) is before  # not fired: the old handler is back
    try:
        with pytest.raises(Terminated), sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as os.kill returns
        os.kill(os.getpid(), signal.SIGTERM)  # a second one is ignored while the process cleans up
    finally:
        signal.signal(signal.SIGTERM, before)
