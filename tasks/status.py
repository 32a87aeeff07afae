"""What is in the database: model columns and their coverage, documents by status."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from tasks.db import Connection, index_validity
from tasks.registry import list_models


def model_coverage(conn: Connection) -> list[dict[str, Any]]:
    """One entry per registered model: coverage of its column and the state of its index."""
    total_row = conn.execute("SELECT count(*) FROM chunks").fetchone()
    total = int(total_row[0]) if total_row else 0
    indexes = index_validity(conn)
    entries = []
    for model in list_models(conn):
        embedded = 0
        if model.status != "retired":
            row = conn.execute(
                sql.SQL("SELECT count({}) FROM chunks").format(sql.Identifier(model.column_name))
            ).fetchone()
            embedded = int(row[0]) if row else 0
        valid = indexes.get(model.index_name)
        entries.append(
            {
                "slug": model.slug,
                "model_key": model.model_key,
                "provider": model.provider,
                "model": model.model,
                "dimensions": model.dimensions,
                "precision": model.precision,
                "column": model.column_name,
                "status": model.status,
                "embedded": embedded,
                "missing": total - embedded if model.status != "retired" else 0,
                "total": total,
                "coverage": round(embedded / total, 4) if total else 1.0,
                "index_present": valid is not None,
                "index_valid": bool(valid),
            }
        )
    return entries


def document_counts(conn: Connection) -> dict[str, int]:
    counts = {"active": 0, "stale": 0}
    for status, count in conn.execute("SELECT status, count(*) FROM documents GROUP BY status"):
        counts[status] = int(count)
    return counts


def database_status(conn: Connection) -> dict[str, Any]:
    models = model_coverage(conn)
    primary = next((m for m in models if m["status"] == "active"), None)
    chunks = models[0]["total"] if models else _count(conn, "chunks")
    return {
        "documents": document_counts(conn),
        "chunks": chunks,
        "models": models,
        "primary_model": primary["slug"] if primary else None,
    }


def _count(conn: Connection, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0


def format_status(status: dict[str, Any]) -> str:
    docs = status["documents"]
    lines = [
        f"documents  {docs.get('active', 0)} active, {docs.get('stale', 0)} stale",
        f"chunks     {status['chunks']}",
        f"primary    {status['primary_model'] or '(none)'}",
        "models:",
    ]
    for m in status["models"]:
        index = "index ok" if m["index_valid"] else ("index INVALID" if m["index_present"] else "no index")
        lines.append(
            f"  {m['slug']:<32} {m['status']:<11} {m['model_key']}  {m['precision']}({m['dimensions']})"
            f"  {m['embedded']}/{m['total']} embedded, {m['missing']} missing, {index}"
        )
    return "\n".join(lines)
