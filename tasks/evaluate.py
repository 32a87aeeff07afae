"""Retrieval evaluation: labelled cases, rank metrics, and runs of the cases against the database.

A case is one JSON line: `id`, `query`, `expected_paths` (relative to the
ingested source), optional `expected_headings` (paired with `expected_paths` by
position) and optional `namespace`. Each expected path, or (path, heading) pair,
is one target. A hit finds a target when its path is the target's and, where a
heading is given, the heading is on the hit's heading path. Only the first hit
of a target counts as relevant: a second chunk of the same section is a miss.

Every case is scored at two levels:

- **page**: the ranking as pages, each page once at the rank of its best chunk;
  the targets are the case's distinct expected pages;
- **chunk**: the ranking as chunks; the targets are the case's sections (or,
  without `expected_headings`, its pages, found by their first chunk).

The headline metrics of a run read each case at its own level: page for a case
without `expected_headings`, chunk for a case with them. A case whose query no
search can take (a NUL byte, a megabyte of text) fails alone, named by its id,
and scores nothing; the others are scored.

The ranking the metrics read is the one search returns: ties in score were
already broken there (by chunk id, or for hybrid by best rank then chunk id).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from tasks.db import Connection
from tasks.ranking import PageHit
from tasks.registry import EmbeddingModel
from tasks.search import (
    CorpusStats,
    SearchError,
    SearchFilters,
    SearchHit,
    SearchOptions,
    check_query,
    corpus_stats,
    search_any,
)

METRICS = ("pass@1", "pass@3", "pass@k", "recall@k", "mrr", "ndcg@10")
"""Reported per (mode, model). pass@k, recall@k and MRR read the top k; nDCG always the top 10."""
NDCG_DEPTH = 10
GATE_TOLERANCE = 0.02
LEVELS = ("page", "chunk")
GATED = (*METRICS, *(f"{level}.{name}" for level in LEVELS for name in METRICS))
"""What the baseline gate compares, where the baseline holds it."""
METRIC_LEVELS = {
    "results[].<metric>": "each case at its own level: page for the cases without expected_headings,"
    " chunk for the cases with them (`levels` counts each); the gate and --fail-under read these",
    "results[].page.<metric>": "pages: each page once, at the rank of its best chunk;"
    " the targets are the expected pages",
    "results[].chunk.<metric>": "chunks as ranked; the targets are the expected sections (or pages);"
    " a second chunk of a found target is a miss",
}
"""What each metric of a result reads, as the JSON report says it."""


class CaseFileError(ValueError):
    """A cases file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    heading: str | None = None


@dataclass(frozen=True, slots=True)
class EvalCase:
    id: str
    query: str
    targets: tuple[Target, ...]
    namespace: str | None = None

    @property
    def level(self) -> str:
        """`chunk` when the case names sections, else `page`."""
        return "chunk" if any(target.heading is not None for target in self.targets) else "page"

    @property
    def pages(self) -> tuple[Target, ...]:
        """The distinct expected pages."""
        return tuple(dict.fromkeys(Target(target.path) for target in self.targets))


# --- cases --------------------------------------------------------------------------


def parse_case(data: Any, where: str) -> EvalCase:
    if not isinstance(data, dict):
        raise CaseFileError(f"{where}: expected a JSON object")
    for key in ("id", "query"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise CaseFileError(f"{where}: `{key}` must be a non-empty string")
    paths = _string_list(data.get("expected_paths"), "expected_paths", where)
    if not paths:
        raise CaseFileError(f"{where}: `expected_paths` must name at least one path")
    headings: list[str | None] = [None] * len(paths)
    if data.get("expected_headings") is not None:
        headings = list(_string_list(data["expected_headings"], "expected_headings", where))
        if len(headings) != len(paths):
            raise CaseFileError(
                f"{where}: `expected_headings` pairs with `expected_paths` by position;"
                f" got {len(headings)} headings for {len(paths)} paths"
            )
    namespace = data.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise CaseFileError(f"{where}: `namespace` must be a string")
    targets = tuple(dict.fromkeys(Target(p.strip("/"), h) for p, h in zip(paths, headings, strict=True)))
    return EvalCase(data["id"], data["query"], targets, namespace)


def _string_list(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise CaseFileError(f"{where}: `{name}` must be a list of non-empty strings")
    return value


def load_cases(path: Path) -> list[EvalCase]:
    """Every case in a JSON-lines file; blank lines and `#` comments are skipped. Ids must be unique."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CaseFileError(f"cannot read cases file {path}: {exc.strerror or exc}") from None
    cases: list[EvalCase] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaseFileError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        cases.append(parse_case(data, f"{path}:{number}"))
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise CaseFileError(f"{path}: case id {case.id!r} appears twice")
        seen.add(case.id)
    if not cases:
        raise CaseFileError(f"{path} holds no cases")
    return cases


# --- metrics (pure) -----------------------------------------------------------------


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def finds(target: Target, path: str, heading_path: Sequence[str]) -> bool:
    if path.strip("/") != target.path:
        return False
    return target.heading is None or _normal(target.heading) in {_normal(h) for h in heading_path}


def relevance(ranked: Sequence[tuple[str, Sequence[str]]], targets: Sequence[Target]) -> list[int]:
    """1 where a hit (path, heading path) finds a target no hit above it found, else 0."""
    found: set[Target] = set()
    marks = []
    for path, heading_path in ranked:
        new = next((t for t in targets if t not in found and finds(t, path, heading_path)), None)
        if new is not None:
            found.add(new)
        marks.append(int(new is not None))
    return marks


def passed_at(marks: Sequence[int], k: int) -> float:
    return 1.0 if any(marks[:k]) else 0.0


def recall_at(marks: Sequence[int], targets: int, k: int) -> float:
    return sum(marks[:k]) / targets if targets else 0.0


def reciprocal_rank(marks: Sequence[int], k: int) -> float:
    """1 / the rank of the first relevant hit in the top k; 0 when there is none."""
    for rank, mark in enumerate(marks[:k], 1):
        if mark:
            return 1.0 / rank
    return 0.0


def ndcg_at(marks: Sequence[int], targets: int, k: int = NDCG_DEPTH) -> float:
    """Binary-gain nDCG: DCG of the top k over the DCG of the ideal order (every target on top)."""
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(targets, k) + 1))
    if ideal == 0:
        return 0.0
    dcg = sum(mark / math.log2(rank + 1) for rank, mark in enumerate(marks[:k], 1))
    return dcg / ideal


def case_metrics(marks: Sequence[int], targets: int, k: int) -> dict[str, float]:
    return {
        "pass@1": passed_at(marks, 1),
        "pass@3": passed_at(marks, 3),
        "pass@k": passed_at(marks, k),
        "recall@k": recall_at(marks, targets, k),
        "mrr": reciprocal_rank(marks, k),
        "ndcg@10": ndcg_at(marks, targets, NDCG_DEPTH),
    }


# --- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseResult:
    case_id: str
    metrics: Mapping[str, float]
    """At the case's own level (`level`)."""
    ranked: tuple[tuple[str, tuple[str, ...], int], ...]
    """(path, heading path, chunk id) of each chunk, best first."""
    page: Mapping[str, float] = field(default_factory=dict)
    chunk: Mapping[str, float] = field(default_factory=dict)
    level: str = "chunk"
    error: str | None = None
    """Why the case could not be searched; it then scores nothing."""

    @property
    def passed(self) -> bool:
        return self.metrics["pass@k"] > 0

    def at(self, level: str) -> Mapping[str, float]:
        return {"page": self.page, "chunk": self.chunk}.get(level, self.metrics)


@dataclass(frozen=True, slots=True)
class EvalSummary:
    """The metrics of one (mode, model) over every case, at the cases' own levels and at each level."""

    mode: str
    model: str | None
    k: int
    metrics: Mapping[str, float]
    failing: tuple[str, ...]
    """Ids of the cases with no target in the top k (at their own level), errors included."""
    cases: int
    group_by: str = "chunk"
    levels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """`page` and `chunk`: their metrics and failing ids."""
    counts: Mapping[str, int] = field(default_factory=dict)
    """How many cases are scored at each level in `metrics`."""
    errors: tuple[tuple[str, str], ...] = ()
    """(case id, reason) of each case that could not be searched."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "model": self.model,
            "k": self.k,
            "cases": self.cases,
            **{name: round(self.metrics[name], 4) for name in METRICS},
            "failing": list(self.failing),
            "group_by": self.group_by,
            "levels": {level: self.counts.get(level, 0) for level in LEVELS},
            **{level: dict(self.levels.get(level, {})) for level in LEVELS},
            "errors": [{"id": case_id, "reason": reason} for case_id, reason in self.errors],
        }


def chunk_ranking(hits: Sequence[SearchHit | PageHit]) -> list[SearchHit]:
    """The chunks of a result, best first: a page's cited chunks in its place."""
    chunks: list[SearchHit] = []
    for hit in hits:
        chunks.extend(hit.chunks if isinstance(hit, PageHit) else (hit,))
    return chunks


def page_ranking(chunks: Sequence[SearchHit]) -> list[str]:
    """Each page once, at the rank of its best chunk."""
    return list(dict.fromkeys(chunk.path for chunk in chunks))


def score_case(case: EvalCase, hits: Sequence[SearchHit | PageHit], k: int) -> CaseResult:
    chunks = chunk_ranking(hits)
    ranked = tuple((hit.path, hit.heading_path, hit.chunk_id) for hit in chunks)
    chunk_marks = relevance([(path, headings) for path, headings, _ in ranked], case.targets)
    page_marks = relevance([(path, ()) for path in page_ranking(chunks)], case.pages)
    levels = {
        "chunk": case_metrics(chunk_marks, len(case.targets), k),
        "page": case_metrics(page_marks, len(case.pages), k),
    }
    return CaseResult(case.id, levels[case.level], ranked, levels["page"], levels["chunk"], case.level)


def failed_case(case: EvalCase, reason: str) -> CaseResult:
    """A case that could not be searched: it scores nothing at every level."""
    zero = dict.fromkeys(METRICS, 0.0)
    return CaseResult(case.id, zero, (), zero, zero, case.level, reason)


def summarize(
    mode: str, model: str | None, k: int, results: Sequence[CaseResult], group_by: str = "chunk"
) -> EvalSummary:
    levels = {
        level: {
            **_means(results, level),
            "failing": [r.case_id for r in results if not r.at(level)["pass@k"]],
        }
        for level in LEVELS
    }
    failing = tuple(r.case_id for r in results if not r.passed)
    counts = {level: sum(1 for r in results if r.level == level) for level in LEVELS}
    errors = tuple((r.case_id, r.error) for r in results if r.error is not None)
    return EvalSummary(
        mode, model, k, _means(results, None), failing, len(results), group_by, levels, counts, errors
    )


def _means(results: Sequence[CaseResult], level: str | None) -> dict[str, float]:
    count = len(results)
    return {
        name: (sum(r.at(level or "")[name] for r in results) / count if count else 0.0) for name in METRICS
    }


# --- running cases --------------------------------------------------------------------

QUERY_ERRORS = (SearchError, psycopg.DataError, psycopg.errors.ProgramLimitExceeded)
"""What the text of one case can make go wrong: the case fails, the run goes on."""


def run_cases(
    conn: Connection,
    cases: Sequence[EvalCase],
    *,
    options: SearchOptions,
    model: EmbeddingModel | None = None,
    vectors: np.ndarray[Any, Any] | None = None,
    stats: CorpusStats | None = None,
) -> list[CaseResult]:
    """Search every case in `options.mode`, by chunk or by page as `options.group_by` says;
    `vectors` holds one query vector per case (not for lexical)."""
    depth = replace(options, k=max(options.k, NDCG_DEPTH))
    stats = stats or corpus_stats(conn)
    results = []
    for index, case in enumerate(cases):
        vector = None if vectors is None else vectors[index]
        try:
            check_query(case.query)
            with conn.transaction():  # a failed query leaves the connection usable
                hits = search_any(
                    conn,
                    case.query,
                    options=depth,
                    filters=SearchFilters(namespace=case.namespace),
                    model=model,
                    vector=vector,
                    stats=stats,
                )
        except QUERY_ERRORS as exc:
            results.append(failed_case(case, f"case {case.id}: {exc}"))
            continue
        results.append(score_case(case, hits, options.k))
    return results


# --- thresholds and the gate ----------------------------------------------------------


def parse_threshold(text: str) -> tuple[str, float]:
    """`metric=value`, e.g. `mrr=0.5`, or `level.metric=value` (`page.mrr=0.5`, `chunk.mrr=0.5`)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name.rpartition(".")[2] not in METRICS or name.rpartition(".")[0] not in ("", *LEVELS):
        raise ValueError(
            f"--fail-under needs metric=value with metric one of {', '.join(METRICS)},"
            f" optionally as page.metric or chunk.metric; got {text!r}"
        )
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--fail-under {name}: {value!r} is not a number") from None
    return name, number


def metric_value(row: Mapping[str, Any], name: str) -> float | None:
    """`mrr` from the row itself, `page.mrr` from its page level; None where the row has no such value."""
    level, _, metric = name.rpartition(".")
    values = row.get(level, {}) if level else row
    return float(values[metric]) if isinstance(values, Mapping) and metric in values else None


def threshold_failures(rows: Sequence[Mapping[str, Any]], thresholds: Mapping[str, float]) -> list[str]:
    """One line per (mode, model, metric) under its threshold; rows as `EvalSummary.to_dict` gives."""
    return [
        f"{row['mode']}/{row['model'] or '-'}: {name} {value:.4f} is under {floor}"
        for row in rows
        for name, floor in thresholds.items()
        if (value := metric_value(row, name) or 0.0) < floor
    ]


def gate_failures(
    current: Sequence[Mapping[str, Any]],
    baseline: Sequence[Mapping[str, Any]],
    *,
    tolerance: float = GATE_TOLERANCE,
) -> list[str]:
    """Every metric that fell more than `tolerance` below the baseline, matched by (mode, model).

    Both sides are the `results` of `ragingest eval --json`. A baseline row with no
    current row is a failure too: a mode that stopped running cannot pass. Where the
    baseline has page and chunk levels, they are held too (as `page.mrr`, `chunk.mrr`).
    """
    now = {(row["mode"], row["model"]): row for row in current}
    problems = []
    for base in baseline:
        key = (base["mode"], base["model"])
        row = now.get(key)
        if row is None:
            problems.append(f"{key[0]}/{key[1] or '-'}: no result to compare with the baseline")
            continue
        for name in GATED:
            floor, value = metric_value(base, name), metric_value(row, name)
            if floor is not None and (value or 0.0) < floor - tolerance:
                problems.append(
                    f"{key[0]}/{key[1] or '-'}: {name} {value or 0.0:.4f} is more than {tolerance}"
                    f" below the baseline {floor:.4f}"
                )
    return problems


# --- output -----------------------------------------------------------------------------


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Result objects (as `EvalSummary.to_dict` gives) as flat rows, one per level (page, chunk,
    and `mixed` where the cases are of both levels); the failing ids become a count."""
    return [
        {
            "mode": row["mode"],
            "model": row["model"] or "-",
            "level": level,
            "k": row["k"],
            "cases": row["cases"],
            **{name: values[name] for name in METRICS},
            "failing": len(values["failing"]),
        }
        for row in results
        for level, values in _shown_levels(row)
    ]


def _shown_levels(row: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    counts = row.get("levels", {})
    shown = [(level, row[level]) for level in LEVELS if isinstance(row.get(level), Mapping)]
    if not shown or all(counts.get(level, 0) for level in LEVELS):
        shown.append(("mixed", row))
    return shown


def headline_note(results: Sequence[Mapping[str, Any]]) -> str:
    """Which level the headline metrics (the gate's, --fail-under's) read, in one line."""
    if not results or "levels" not in results[0]:
        return ""
    counts = results[0]["levels"]
    parts = [
        f"{level} level for the {counts[level]} cases {wording}"
        for level, wording in (("chunk", "with expected_headings"), ("page", "without"))
        if counts.get(level)
    ]
    return (
        "page: each page once, at its best chunk's rank; chunk: sections (a page target by its first"
        f" chunk). Gate and --fail-under read {' and '.join(parts)}"
        + (" (the `mixed` rows)." if len(parts) > 1 else ".")
    )


def format_errors(results: Sequence[Mapping[str, Any]]) -> str:
    """Each case that could not be searched, once, with the reason."""
    reasons = {error["id"]: error["reason"] for row in results for error in row.get("errors", [])}
    return "\n".join(f"error {reason}" for reason in reasons.values())


def publish_artifacts(summaries: Sequence[EvalSummary], cases_file: str) -> bool:
    """A table artifact with one row per (mode, model); only inside a Prefect flow run."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return False
    create_table_artifact(
        key="evaluation-metrics",
        table=table_rows([s.to_dict() for s in summaries]),
        description=f"Retrieval quality on {cases_file}",
    )
    return True


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    rows = table_rows(results)
    if not rows:
        return "no results"
    headers = list(rows[0])
    cells = [[_cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_failing(results: Sequence[Mapping[str, Any]], *, most: int = 20) -> str:
    """The ids of the failing cases per (mode, model), the first `most` of them."""
    lines = []
    for row in results:
        if row["failing"]:
            shown = ", ".join(row["failing"][:most])
            more = f" and {len(row['failing']) - most} more" if len(row["failing"]) > most else ""
            lines.append(f"failing {row['mode']}/{row['model'] or '-'}: {shown}{more}")
    return "\n".join(lines)


def format_comparison(results: Sequence[Mapping[str, Any]], first: str, second: str) -> str:
    """Two models side by side, per mode: each metric and the change from the first to the second."""
    by_key = {(row["mode"], row["model"]): row for row in results}
    width = max(len(first), len(second), 8)
    lines = []
    for mode in dict.fromkeys(row["mode"] for row in results if row["model"] is not None):
        a, b = by_key.get((mode, first)), by_key.get((mode, second))
        if a is None or b is None:
            continue
        lines.append(f"{mode:<10}  {first:>{width}}  {second:>{width}}  {'change':>8}")
        for name in METRICS:
            change = float(b[name]) - float(a[name])
            lines.append(f"  {name:<8}  {a[name]:>{width}.4f}  {b[name]:>{width}.4f}  {change:>+8.4f}")
        lines.append(f"  {'failing':<8}  {len(a['failing']):>{width}}  {len(b['failing']):>{width}}")
    return "\n".join(lines)
