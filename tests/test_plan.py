"""The plan stage: pure sorting of found files against stored hashes."""

from __future__ import annotations

from tasks.plan import plan_changes
from tasks.records import FileFailure, FoundFile


def found(path: str, digest: bytes) -> FoundFile:
    return FoundFile(path, f"/src/{path}", 1, digest)


def test_plan_sorts_new_changed_unchanged_and_deleted() -> None:
    stored = {"a.md": b"1", "b.md": b"2", "gone.md": b"3", "broken.md": b"4", "locked/x.md": b"5"}
    plan = plan_changes(
        [
            found("a.md", b"1"),
            found("b.md", b"changed"),
            found("new.md", b"6"),
            FileFailure("broken.md", "invalid UTF-8"),
            FileFailure("locked", "cannot list folder"),
        ],
        stored,
    )
    assert [f.path for f in plan.new] == ["new.md"]
    assert [f.path for f in plan.changed] == ["b.md"]
    assert [f.path for f in plan.unchanged] == ["a.md"]
    assert plan.deleted == ["gone.md"]  # a failed file, or one under an unlistable folder, is kept
    assert [f.path for f in plan.failed] == ["broken.md", "locked"]


def test_full_refresh_treats_every_stored_file_as_changed() -> None:
    plan = plan_changes([found("a.md", b"1")], {"a.md": b"1"}, full_refresh=True)
    assert [f.path for f in plan.changed] == ["a.md"] and plan.unchanged == []
