"""Report: the run summary as JSON, a row in `ingest_runs`, and Prefect artifacts."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from tasks.db import Connection
from tasks.index import IndexPlan
from tasks.load import LoadResult
from tasks.plan import ChangePlan
from tasks.pool import ConnectionSource
from tasks.prepare import PrepareStats
from tasks.records import FileFailure
from tasks.stage import in_flow_run

log = logging.getLogger(__name__)

Summary = dict[str, Any]
"""A run's summary as JSON: the keys of `ingest --json`, a public contract."""


class StageClock:
    """Wall time of the stages a run times itself; the rest comes from the stages' own figures."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started

    def seconds(self, prepared: PrepareStats, loaded: LoadResult) -> dict[str, float]:
        """The `seconds` of the summary, in its fixed key order."""
        return {
            "discover": self._seconds.get("discover", 0.0),
            "chunk": prepared.chunk_seconds,
            "cache": prepared.cache_seconds,
            "embed": prepared.embed.seconds,
            "stage": prepared.stage_seconds,
            "load": loaded.load_seconds,
            "index": loaded.index_seconds,
            "vacuum": self._seconds.get("vacuum", 0.0),
            "total": time.perf_counter() - self._started,
        }


@dataclass(frozen=True, slots=True)
class Execution:
    """Where the shards ran."""

    runner: str = "in-process"
    workers: int = 1


@dataclass(slots=True)
class RunSummary:
    """Everything a run reports; `to_dict` gives the `--json` keys."""

    source: str
    models: list[str]
    plan: ChangePlan
    prepared: PrepareStats
    loaded: LoadResult
    seconds: dict[str, float]
    cost_per_million: float
    execution: Execution = field(default_factory=Execution)
    run_id: int | None = None

    @property
    def failures(self) -> list[FileFailure]:
        return self.plan.failed + self.prepared.failures

    def to_dict(self) -> Summary:
        return {
            "source": self.source,
            "models": self.models,
            "documents": self._documents(),
            "chunks": {
                "written": self.loaded.chunks_written,
                "deleted": self.loaded.chunks_deleted,
                "total": self.loaded.chunks_total,
            },
            "embeddings": self._embeddings(),
            "failures": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "skipped": self._skipped(),
            "index": self._index(),
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
            "oversize": [{"path": f.path, "reason": f.reason} for f in self.prepared.oversize[:100]],
            "execution": self._execution(),
            "run_id": self.run_id,
        }

    def _documents(self) -> dict[str, int]:
        plan, prepared = self.plan, self.prepared
        failed = {f.path for f in self.failures} | set(prepared.excluded)
        return {
            "seen": len(plan.new) + len(plan.changed) + len(plan.unchanged) + len(plan.failed),
            "new": sum(1 for f in plan.new if f.path not in failed),
            "changed": sum(1 for f in plan.changed if f.path not in failed),
            "unchanged": len(plan.unchanged),
            "deleted": self.loaded.documents_deleted,
            "failed": len(self.failures),
            "excluded": len(prepared.excluded),
        }

    def _embeddings(self) -> dict[str, Any]:
        embed = self.prepared.embed
        return {
            "cache_hits": self.prepared.cache_hits,
            "cache_misses": self.prepared.cache_misses,
            "embedded": embed.embedded,
            "tokens": embed.tokens,
            "truncated": embed.truncated,
            "retries": embed.retries,
            "batches": embed.batches,
            "estimated_cost_usd": round(embed.tokens * self.cost_per_million / 1_000_000, 6),
            "oversize": len(self.prepared.oversize),
            "precision": self.prepared.precision,
        }

    def _skipped(self) -> list[dict[str, str]]:
        empty = [{"path": f.path, "reason": f.reason} for f in self.prepared.empty]
        excluded = [{"path": path, "reason": "rag_include: false"} for path in self.prepared.excluded]
        links = [{"path": f.path, "reason": f.reason} for f in self.plan.skipped]
        return empty + excluded + links

    def _index(self) -> dict[str, Any]:
        plan = self.loaded.index_plan or IndexPlan("none", False, "nothing to load")
        return {
            "strategy": plan.strategy,
            "dropped": self.loaded.indexes_dropped,
            "rebuilt": self.loaded.indexes_built,
            "reason": plan.reason,
        }

    def _execution(self) -> dict[str, Any]:
        times = self.prepared.shard_seconds
        spread = {"min": 0.0, "median": 0.0, "max": 0.0}
        if times:
            spread = {"min": min(times), "median": statistics.median(times), "max": max(times)}
        return {
            "runner": self.execution.runner,
            "workers": self.execution.workers,
            "shards": len(times),
            "shard_seconds": {name: round(value, 3) for name, value in spread.items()},
        }


def record_run(
    conn: Connection, summary: Summary, started_at: datetime, failures: Sequence[FileFailure]
) -> int:
    """Store the summary and the failures; returns the run id."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO ingest_runs (source, started_at, summary) VALUES (%s, %s, %s) RETURNING id",
            (summary["source"], started_at, Jsonb(summary)),
        ).fetchone()
        assert row is not None
        run_id = int(row[0])
        if failures:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO ingest_failures (run_id, path, reason) VALUES (%s, %s, %s)",
                    [(run_id, f.path, f.reason) for f in failures],
                )
    return run_id


def record_summary(connections: ConnectionSource, summary: RunSummary, started_at: datetime) -> int:
    """The report stage: store the run and its failures; returns the run id."""
    with connections.connection() as conn:
        return record_run(conn, summary.to_dict(), started_at, summary.failures)


def summary_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten the nested summary into metric/value rows, for a table artifact or a terminal."""
    rows: list[dict[str, Any]] = []
    for section in ("documents", "chunks", "embeddings", "index", "seconds", "execution"):
        for key, value in summary.get(section, {}).items():
            rows.append({"metric": f"{section}.{key}", "value": value})
    return rows


def failures_markdown(failures: Sequence[Mapping[str, str]]) -> str:
    if not failures:
        return "No file failed."
    lines = [f"{len(failures)} file(s) were skipped:", "", "| path | reason |", "|---|---|"]
    for failure in failures:
        path = failure["path"].replace("|", "\\|")
        reason = failure["reason"].replace("|", "\\|")
        lines.append(f"| `{path}` | {reason} |")
    return "\n".join(lines)


def publish_artifacts(summary: Mapping[str, Any]) -> bool:
    """A table artifact with the counts and a markdown artifact with the failures.

    Only inside a Prefect flow run; returns whether anything was published.
    """
    if not in_flow_run():
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        key="ingest-summary", table=summary_table(summary), description=f"Ingest of {summary['source']}"
    )
    create_markdown_artifact(
        key="ingest-failures",
        markdown=failures_markdown(summary["failures"]),
        description="Files that could not be ingested, with the reason",
    )
    return True


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short human summary for the terminal."""
    d, c, e, i, s = (summary[k] for k in ("documents", "chunks", "embeddings", "index", "seconds"))
    lines = [
        f"source     {summary['source']}",
        f"documents  {d['seen']} seen: {d['new']} new, {d['changed']} changed, {d['unchanged']} unchanged,"
        f" {d['deleted']} deleted, {d['failed']} failed, {d['excluded']} excluded by rag_include",
        f"chunks     {c['written']} written, {c['deleted']} deleted, {c['total']} in the table",
        f"embeddings {e['cache_hits']} cache hits, {e['cache_misses']} misses, {e['embedded']} embedded,"
        f" {e['tokens']} tokens, {e['truncated']} truncated, ~${e['estimated_cost_usd']:.4f}",
        f"index      {i['strategy']}: dropped {i['dropped']}, rebuilt {i['rebuilt']} ({i['reason']})",
        "seconds    " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()),
    ]
    for failure in summary["failures"]:
        lines.append(f"failed     {failure['path']}: {failure['reason']}")
    return "\n".join(lines)
