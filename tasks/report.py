"""Report: the run summary as JSON, a row in `ingest_runs`, and Prefect artifacts."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from tasks.db import Connection
from tasks.records import FileFailure

log = logging.getLogger(__name__)

Summary = dict[str, Any]


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


def summary_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten the nested summary into metric/value rows, for a table artifact or a terminal."""
    rows: list[dict[str, Any]] = []
    for section in ("documents", "chunks", "embeddings", "index", "seconds"):
        for key, value in summary[section].items():
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
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return False
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
