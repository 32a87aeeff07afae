"""Plan: compare the files on disk with `documents` by content hash."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tasks.db import Connection
from tasks.records import FileFailure, FoundFile


@dataclass(slots=True)
class ChangePlan:
    new: list[FoundFile] = field(default_factory=list)
    changed: list[FoundFile] = field(default_factory=list)
    unchanged: list[FoundFile] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    """Paths stored for this source whose files are gone."""
    failed: list[FileFailure] = field(default_factory=list)

    @property
    def to_prepare(self) -> list[FoundFile]:
        return self.new + self.changed


def stored_hashes(conn: Connection, source: str) -> dict[str, bytes]:
    rows = conn.execute("SELECT path, content_hash FROM documents WHERE source = %s", (source,))
    return {path: bytes(digest) for path, digest in rows}


def plan_changes(
    found: Iterable[FoundFile | FileFailure],
    stored: Mapping[str, bytes],
    *,
    full_refresh: bool = False,
) -> ChangePlan:
    """Sort what the walk found into new, changed, unchanged and deleted.

    A file that failed is not deleted: its stored version stays until it is fixed. Nor is
    anything under a folder that could not be listed.
    `full_refresh` treats every stored file as changed (the cache still saves the embedding).
    """
    plan = ChangePlan()
    seen: set[str] = set()
    for item in found:
        seen.add(item.path)
        if isinstance(item, FileFailure):
            plan.failed.append(item)
        elif item.path not in stored:
            plan.new.append(item)
        elif full_refresh or stored[item.path] != item.content_hash:
            plan.changed.append(item)
        else:
            plan.unchanged.append(item)
    unlisted = tuple(f"{f.path.rstrip('/')}/" for f in plan.failed)
    plan.deleted = sorted(path for path in stored if path not in seen and not path.startswith(unlisted))
    return plan
