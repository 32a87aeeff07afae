"""Source identity, odd file names and symlinks, through whole ingest runs against the real Postgres."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.discover import SourceError
from tests.embedders import CountingFactory

PAGE = "# {title}\n\nThe page about {title}, with enough words to make one chunk.\n"


def write_pages(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PAGE.format(title=Path(name).stem), encoding="utf-8")
    return root


def ingest(settings: Any, root: Path, **kwargs: Any) -> dict[str, Any]:
    return run_ingest(settings, root, embedder_factory=CountingFactory(), **kwargs)


def stored(conn: Connection) -> set[tuple[str, str]]:
    return set(conn.execute("SELECT source, path FROM documents").fetchall())


def failures_of(summary: dict[str, Any]) -> dict[str, str]:
    return {failure["path"]: failure["reason"] for failure in summary["failures"]}


# --- file names --------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_one_failure_and_the_rest_ingest(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    root = write_pages(tmp_path / "kb", "good.md", "docs/also-good.md")
    with open(os.fsencode(root) + b"/bad\xffname.md", "wb") as bad:
        bad.write(b"# Bad name\n\nText.\n")

    summary = ingest(settings, root)

    assert failures_of(summary) == {"bad\\xffname.md": "file name is not valid UTF-8; rename the file"}
    assert summary["documents"]["new"] == 2
    assert {path for _, path in stored(conn)} == {"good.md", "docs/also-good.md"}


def test_names_with_newlines_dashes_spaces_and_either_unicode_form_ingest_as_given(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    names = ["line\nbreak.md", "-rf.md", "--.md", " spaced out .md", "caf\u00e9.md", "cafe\u0301.md"]
    root = write_pages(tmp_path / "kb", *names)

    summary = ingest(settings, root)

    assert summary["failures"] == []
    assert {path for _, path in stored(conn)} == set(names)
    assert ingest(settings, root)["documents"]["unchanged"] == len(names)


# --- source identity ---------------------------------------------------------


def test_a_source_reached_through_a_switched_symlink_stays_one_source(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    write_pages(tmp_path / "releases" / "v1", "a.md", "b.md", "c.md", "d.md", "removed.md")
    write_pages(tmp_path / "releases" / "v2", "a.md", "b.md", "c.md", "d.md", "e.md", "f.md")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1", target_is_directory=True)
    ingest(settings, current)

    switched = tmp_path / "current.next"
    switched.symlink_to(tmp_path / "releases" / "v2", target_is_directory=True)
    os.replace(switched, current)
    summary = ingest(settings, current)

    assert summary["source"] == str(current)
    assert summary["documents"]["deleted"] == 1 and summary["documents"]["new"] == 2
    assert stored(conn) == {(str(current), f"{page}.md") for page in "abcdef"}


def test_a_source_name_wins_over_the_path(settings: Any, tmp_path: Path, conn: Connection) -> None:
    root = write_pages(tmp_path / "kb", "a.md")
    summary = ingest(settings, root, source_name="handbook")
    assert summary["source"] == "handbook"
    assert stored(conn) == {("handbook", "a.md")}


def test_a_source_path_that_is_not_utf8_is_refused_before_anything_unless_named(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/kb\xff"))
    write_pages(root, "a.md")

    with pytest.raises(SourceError, match="not valid UTF-8; name the source instead"):
        ingest(settings, root)
    assert stored(conn) == set()

    assert ingest(settings, root, source_name="kb")["documents"]["new"] == 1
    assert stored(conn) == {("kb", "a.md")}


# --- symlinks ----------------------------------------------------------------


def test_a_linked_folder_whose_target_vanished_keeps_its_documents(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    root = write_pages(tmp_path / "kb", "index.md")
    write_pages(root / ".versions" / "v1", "guide.md", "deep/faq.md")
    (root / "docs").symlink_to(".versions/v1", target_is_directory=True)
    assert ingest(settings, root)["documents"]["new"] == 3

    shutil.rmtree(root / ".versions" / "v1")
    summary = ingest(settings, root)

    assert failures_of(summary) == {"docs": "broken symlink"}
    assert summary["documents"]["deleted"] == 0
    assert {path for _, path in stored(conn)} == {"index.md", "docs/guide.md", "docs/deep/faq.md"}


def test_links_that_leave_the_source_are_not_followed(
    settings: Any, tmp_path: Path, conn: Connection
) -> None:
    root = write_pages(tmp_path / "kb", "index.md")
    outside = write_pages(tmp_path / "outside", "secret.md", "shared/guide.md")
    (root / "passwd.md").symlink_to(outside / "secret.md")
    (root / "shared").symlink_to(outside / "shared", target_is_directory=True)

    summary = ingest(settings, root)

    assert summary["failures"] == []
    assert {path for _, path in stored(conn)} == {"index.md"}


def test_a_file_replaced_by_a_folder_between_runs(settings: Any, tmp_path: Path, conn: Connection) -> None:
    root = write_pages(tmp_path / "kb", "topic.md", "other.md")
    ingest(settings, root)
    (root / "topic.md").unlink()
    write_pages(root / "topic.md", "inner.md")

    summary = ingest(settings, root)

    assert summary["documents"]["deleted"] == 1 and summary["documents"]["new"] == 1
    assert {path for _, path in stored(conn)} == {"other.md", "topic.md/inner.md"}


def test_links_out_of_the_source_are_listed_as_skipped_and_followed_when_asked(
    settings: Any, database_url: str, tmp_path: Path, conn: Connection
) -> None:
    from tests.conftest import make_settings

    root = write_pages(tmp_path / "kb", "index.md")
    outside = write_pages(tmp_path / "outside", "secret.md", "shared/guide.md")
    (root / "passwd.md").symlink_to(outside / "secret.md")
    (root / "shared").symlink_to(outside / "shared", target_is_directory=True)

    summary = ingest(settings, root)
    skipped = {entry["path"]: entry["reason"] for entry in summary["skipped"]}
    assert set(skipped) == {"passwd.md", "shared"}
    assert all("outside the source root" in reason for reason in skipped.values())

    following = make_settings(database_url, follow_external_links=True)
    assert ingest(following, root)["skipped"] == []
    assert {path for _, path in stored(conn)} == {"index.md", "passwd.md", "shared/guide.md"}
