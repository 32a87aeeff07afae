"""What is in the database: model columns and their coverage, documents by status."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from tasks.db import Connection, index_validity
from tasks.registry import hnsw_index_name, list_models

LEXICAL_INDEX = "chunks_tsv_gin"


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


def neural_readiness(models: list[dict[str, Any]], chunks: int) -> dict[str, Any]:
    """Ready only when a primary model exists, every chunk has a vector in its column, and its
    HNSW index is present and valid; otherwise `problems` says what is missing."""
    primary = next((m for m in models if m["status"] == "active"), None)
    problems = []
    if primary is None:
        problems.append("no active (primary) embedding model")
    else:
        if primary["missing"]:
            problems.append(f"{primary['missing']} of {chunks} chunks have no vector in {primary['column']}")
        if not primary["index_present"]:
            problems.append(f"index {_index_name(primary)} is missing")
        elif not primary["index_valid"]:
            problems.append(f"index {_index_name(primary)} is INVALID (rebuild it)")
    if chunks == 0:
        problems.append("the database holds no chunks")
    return {"ready": not problems, "model": primary["slug"] if primary else None, "problems": problems}


def lexical_readiness(conn: Connection, chunks: int) -> dict[str, Any]:
    """Ready when chunks exist and the full-text GIN index is present and valid."""
    valid = index_validity(conn).get(LEXICAL_INDEX)
    problems = []
    if valid is None:
        problems.append(f"index {LEXICAL_INDEX} is missing")
    elif not valid:
        problems.append(f"index {LEXICAL_INDEX} is INVALID (rebuild it)")
    if chunks == 0:
        problems.append("the database holds no chunks")
    return {"ready": not problems, "problems": problems}


def _index_name(model: dict[str, Any]) -> str:
    return hnsw_index_name(str(model["column"]))


def database_status(conn: Connection) -> dict[str, Any]:
    models = model_coverage(conn)
    primary = next((m for m in models if m["status"] == "active"), None)
    chunks = models[0]["total"] if models else _count(conn, "chunks")
    return {
        "documents": document_counts(conn),
        "chunks": chunks,
        "models": models,
        "primary_model": primary["slug"] if primary else None,
        "search": {
            "neural": neural_readiness(models, chunks),
            "lexical": lexical_readiness(conn, chunks),
        },
    }


def _count(conn: Connection, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0


def _readiness_line(readiness: dict[str, Any]) -> str:
    if readiness["ready"]:
        return "ready"
    return "NOT READY: " + "; ".join(readiness["problems"])


def format_status(status: dict[str, Any]) -> str:
    docs = status["documents"]
    lines = [
        f"documents  {docs.get('active', 0)} active, {docs.get('stale', 0)} stale",
        f"chunks     {status['chunks']}",
        f"primary    {status['primary_model'] or '(none)'}",
    ]
    if "search" in status:
        lines += [
            f"neural     {_readiness_line(status['search']['neural'])}",
            f"lexical    {_readiness_line(status['search']['lexical'])}",
        ]
    lines.append("models:")
    for m in status["models"]:
        index = "index ok" if m["index_valid"] else ("index INVALID" if m["index_present"] else "no index")
        lines.append(
            f"  {m['slug']:<32} {m['status']:<11} {m['model_key']}  {m['precision']}({m['dimensions']})"
            f"  {m['embedded']}/{m['total']} embedded, {m['missing']} missing, {index}"
        )
    return "\n".join(lines)
