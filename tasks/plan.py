"""Plan: compare the files on disk with `documents` by content hash."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from tasks.db import Connection
from tasks.discover import walk_source
from tasks.pool import ConnectionSource
from tasks.records import FileFailure, FoundFile


@dataclass(slots=True)
class ChangePlan:
    new: list[FoundFile] = field(default_factory=list)
    changed: list[FoundFile] = field(default_factory=list)
    unchanged: list[FoundFile] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    """Paths stored for this source whose files are gone."""
    failed: list[FileFailure] = field(default_factory=list)
    skipped: list[FileFailure] = field(default_factory=list)
    """Links out of the source root that the walk did not follow, with the reason."""

    stored: dict[str, bytes] = field(default_factory=dict)
    """path -> content hash stored when the plan was made (re-checked inside the load lock)."""

    @property
    def to_prepare(self) -> list[FoundFile]:
        return self.new + self.changed

    def paths_to_delete(self, excluded: Iterable[str]) -> list[str]:
        """Gone files, and stored pages that now say `rag_include: false`."""
        stored = {f.path for f in self.changed} | set(self.deleted)
        return self.deleted + [path for path in excluded if path in stored]

    def is_empty(self) -> bool:
        """Nothing to prepare, delete or mark stale: the load has nothing to do."""
        return not (self.new or self.changed or self.deleted or self.failed)


def discover_changes(
    connections: ConnectionSource,
    root: Path,
    source: str,
    settings: Settings,
    full_refresh: bool,
    chunk_config: str,
) -> ChangePlan:
    """Walk the source and sort its files against what is stored (the discover stage)."""
    found = walk_source(
        root,
        include=settings.include,
        exclude=settings.exclude,
        max_bytes=settings.max_file_bytes,
        follow_external_links=settings.follow_external_links,
    )
    with connections.connection() as conn:
        stored, configs = stored_documents(conn, source)
    plan = plan_changes(
        found, stored, full_refresh=full_refresh, chunk_config=chunk_config, stored_configs=configs
    )
    plan.stored = stored
    plan.skipped = list(found.skipped)
    return plan


def stored_documents(conn: Connection, source: str) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """Each stored document's content hash, and what it was chunked with (None: not recorded)."""
    rows = conn.execute(
        "SELECT path, content_hash, chunk_config FROM documents WHERE source = %s", (source,)
    ).fetchall()
    return {path: bytes(digest) for path, digest, _ in rows}, {path: config for path, _, config in rows}


def plan_changes(
    found: Iterable[FoundFile | FileFailure],
    stored: Mapping[str, bytes],
    *,
    full_refresh: bool = False,
    chunk_config: str | None = None,
    stored_configs: Mapping[str, str | None] | None = None,
) -> ChangePlan:
    """Sort what the walk found into new, changed, unchanged and deleted.

    A file that failed is not deleted: its stored version stays until it is fixed. Nor is
    anything under a folder that could not be listed.
    `full_refresh` treats every stored file as changed (the cache still saves the embedding),
    and so does a `chunk_config` other than the one the file was stored with.
    """
    rechunk: set[str] = set()
    if chunk_config is not None and stored_configs is not None:
        rechunk = {path for path, config in stored_configs.items() if config != chunk_config}
    plan = ChangePlan()
    seen: set[str] = set()
    for item in found:
        seen.add(item.path)
        if isinstance(item, FileFailure):
            plan.failed.append(item)
        elif item.path not in stored:
            plan.new.append(item)
        elif full_refresh or item.path in rechunk or stored[item.path] != item.content_hash:
            plan.changed.append(item)
        else:
            plan.unchanged.append(item)
    unlisted = tuple(f"{f.path.rstrip('/')}/" for f in plan.failed)
    plan.deleted = sorted(path for path in stored if path not in seen and not path.startswith(unlisted))
    return plan
