"""Search the chunks three ways, every hit with its citation.

- `vector`: cosine distance over one model's column, through its HNSW index
  (`hnsw.ef_search` set per query, inside the query's transaction).
- `lexical`: Postgres full text over the `tsv` column (title, headings, body),
  any query term matching, ranked by BM25 with the title and headings weighted up.
- `hybrid`: Reciprocal Rank Fusion of the two, with lexical weighted up for
  queries that name an exact identifier.

Results are chunks by default; grouped by page, each page comes once, at the
rank of its best chunk, with its matching chunks as citations (see `tasks.ranking`).

Model slugs are validated and reach SQL only as quoted identifiers; query text,
filters and vectors only as parameters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
from pgvector import Vector
from psycopg import sql
from psycopg.types.json import Jsonb

from config.settings import Settings
from tasks.db import Connection
from tasks.embed import Embedder, EmbedItem, EmbedPolicy, Vectors, embed_items
from tasks.ranking import (
    DEFAULT_RRF_K,
    GROUPINGS,
    Citation,
    GroupBy,
    PageHit,
    SearchHit,
    count_pages,
    fuse_pages,
    fuse_rrf,
    fusion_weights,
    group_pages,
    looks_like_identifier,
    until_pages,
)
from tasks.records import sha256_text
from tasks.registry import EmbeddingModel, get_model, list_models, validate_slug
from tasks.tokens import count_tokens

__all__ = ["Citation", "PageHit", "SearchHit", "fuse_rrf", "fuse_pages", "looks_like_identifier"]

SearchMode = Literal["vector", "lexical", "hybrid"]
QueryVector = Sequence[float] | np.ndarray[Any, Any]
SEARCH_MODES: tuple[SearchMode, ...] = ("vector", "lexical", "hybrid")

DEFAULT_EF_SEARCH = 40
"""pgvector's own default for `hnsw.ef_search`."""
DEFAULT_DEPTH = 50
"""Candidates each mode hands to the fusion: chunks, or pages when grouping by page."""
MAX_EF_SEARCH = 1_000
"""pgvector's upper bound for `hnsw.ef_search`."""
MAX_CANDIDATES = MAX_EF_SEARCH
"""Most chunks one mode fetches while filling its pages (the most one HNSW scan returns)."""
MAX_QUERY_CHARS = 10_000
"""Longest query text a search takes (Postgres refuses a tsvector over 1 MB long before that)."""
DEFAULT_IDENTIFIER_WEIGHT = 2.0
"""Weight of the lexical list in the fusion when the query names an identifier."""

BM25_K1 = 1.2
BM25_B = 0.75
FIELD_WEIGHTS = {"A": 3.0, "B": 2.0, "C": 1.0, "D": 1.0}
"""How much one occurrence counts in BM25: title (A), headings (B), body (C)."""
MATCH_BUDGET = 20_000
"""Most chunks lexical search scores, as summed term frequencies (see `match_terms`)."""

_LEXICAL_CONFIG = "english"

log = logging.getLogger(__name__)


class SearchError(ValueError):
    """A search that cannot run as asked; the message says what to do."""


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchFilters:
    namespace: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    """`key=value` pairs, each matched against the chunk's metadata or the page's frontmatter."""

    @property
    def empty(self) -> bool:
        return self.namespace is None and not self.where


@dataclass(frozen=True, slots=True)
class SearchOptions:
    mode: SearchMode = "hybrid"
    k: int = 10
    min_score: float | None = None
    """Minimum cosine similarity of a hit (vector and hybrid modes)."""
    ef_search: int = DEFAULT_EF_SEARCH
    rrf_k: int = DEFAULT_RRF_K
    depth: int = DEFAULT_DEPTH
    identifier_weight: float = DEFAULT_IDENTIFIER_WEIGHT
    group_by: GroupBy = "chunk"
    """`chunk`: the k best chunks; `page`: the k best pages, each with its chunks as citations."""

    def __post_init__(self) -> None:
        if self.mode not in SEARCH_MODES:
            raise SearchError(f"unknown mode {self.mode!r}: choose one of {', '.join(SEARCH_MODES)}")
        if self.group_by not in GROUPINGS:
            raise SearchError(f"unknown grouping {self.group_by!r}: choose one of {', '.join(GROUPINGS)}")
        for name in ("k", "ef_search", "rrf_k", "depth"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")


def options_from_settings(settings: Settings, **overrides: Any) -> SearchOptions:
    """Options from the settings (search_* fields where present), then explicit overrides."""
    values: dict[str, Any] = {
        "min_score": getattr(settings, "search_min_score", None),
        "ef_search": getattr(settings, "search_ef_search", DEFAULT_EF_SEARCH),
        "rrf_k": getattr(settings, "search_rrf_k", DEFAULT_RRF_K),
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    return SearchOptions(**values)


def query_problem(text: str) -> str | None:
    """Why no search can take this query text (a NUL byte, more than MAX_QUERY_CHARS), or None."""
    if "\x00" in text:
        return "the query holds a NUL byte (\\x00), which Postgres text cannot carry"
    if len(text) > MAX_QUERY_CHARS:
        return f"the query is {len(text):,} characters long; a search takes at most {MAX_QUERY_CHARS:,}"
    return None


def check_query(text: str) -> None:
    """Refuse query text no search can take, saying why."""
    problem = query_problem(text)
    if problem is not None:
        raise SearchError(problem)


# --- filters ------------------------------------------------------------------------


def parse_where(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`key=value` strings as pairs; the value may be empty, the key may not."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SearchError(f"--where needs key=value, got {item!r}")
        pairs.append((key.strip(), value))
    return tuple(pairs)


def containment_documents(key: str, value: str) -> list[dict[str, Any]]:
    """JSON documents that `metadata @> doc` tests: the value as text, as a JSON scalar, in a list."""
    values: list[Any] = [value]
    try:
        scalar = json.loads(value)
    except ValueError:
        scalar = value
    if isinstance(scalar, bool | int | float) or scalar is None:
        values.append(scalar)
    return [{key: v} for v in values] + [{key: [v]} for v in values]


def filter_clause(filters: SearchFilters) -> tuple[sql.Composable, dict[str, Any]]:
    """A WHERE condition over `c` (chunks) and `d` (documents), and its parameters."""
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: dict[str, Any] = {}
    if filters.namespace is not None:
        clauses.append(sql.SQL("d.namespace = {}").format(sql.Placeholder("namespace")))
        params["namespace"] = filters.namespace
    for index, (key, value) in enumerate(filters.where):
        name = f"where_{index}"
        clauses.append(
            sql.SQL("(c.metadata @> ANY({p}::jsonb[]) OR d.frontmatter @> ANY({p}::jsonb[]))").format(
                p=sql.Placeholder(name)
            )
        )
        params[name] = [Jsonb(doc) for doc in containment_documents(key, value)]
    return sql.SQL(" AND ").join(clauses), params


# --- models and query vectors -----------------------------------------------------


def resolve_model(conn: Connection, slug: str | None = None) -> EmbeddingModel:
    """The named model, or the active (primary) one; a retired or unknown model is refused."""
    if slug is None:
        active = [m for m in list_models(conn) if m.status == "active"]
        if not active:
            raise SearchError("no active embedding model: ingest a folder first, or name one with --model")
        return active[0]
    model = get_model(conn, validate_slug(slug))
    if model is None:
        known = ", ".join(m.slug for m in list_models(conn)) or "none"
        raise SearchError(f"model {slug!r} is not registered (registered: {known})")
    if model.status == "retired":
        raise SearchError(f"model {slug} is retired; its column is no longer filled")
    if model.status == "backfilling":
        log.warning("model %s is still backfilling: chunks without a vector in it cannot be found", slug)
    return model


def embed_queries(embedder: Embedder, queries: Sequence[str], settings: Settings) -> Vectors:
    """One vector per query, in order, batched and retried like the ingest's embeddings."""
    unique = list(dict.fromkeys(queries))
    items = [EmbedItem(sha256_text(q), q, count_tokens(q)) for q in unique]
    found: dict[bytes, np.ndarray[Any, Any]] = {}

    def keep(hashes: Sequence[bytes], vectors: Vectors) -> None:
        found.update(zip(hashes, vectors, strict=True))

    asyncio.run(embed_items(embedder, items, EmbedPolicy.from_settings(settings, embedder), keep))
    if not queries:
        return np.zeros((0, embedder.dimensions), dtype=np.float32)
    return np.stack([found[sha256_text(q)] for q in queries]).astype(np.float32)


# --- vector -------------------------------------------------------------------------

_HIT_COLUMNS = sql.SQL("c.id, d.source, d.path, d.namespace, d.title, c.heading_path, c.content")


def vector_query(model: EmbeddingModel, filters: SearchFilters) -> tuple[sql.Composed, dict[str, Any]]:
    """Nearest chunks by cosine distance. The inner ORDER BY … LIMIT is the shape the HNSW
    index serves; the outer one breaks exact ties by chunk id."""
    where, params = filter_clause(filters)
    column = sql.SQL("c.{}").format(sql.Identifier(model.column_name))
    distance = sql.SQL("{column} <=> {vector}::{type}").format(
        column=column, vector=sql.Placeholder("vector"), type=model.column_type
    )
    query = sql.SQL(
        "SELECT * FROM (SELECT {columns}, {distance} AS distance"
        " FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE {column} IS NOT NULL AND {where}"
        " ORDER BY {distance} LIMIT {limit}) nearest ORDER BY distance, id"
    ).format(
        columns=_HIT_COLUMNS,
        distance=distance,
        column=column,
        where=where,
        limit=sql.Placeholder("limit"),
    )
    return query, params


def vector_search(
    conn: Connection,
    model: EmbeddingModel,
    vector: QueryVector,
    *,
    limit: int,
    filters: SearchFilters = SearchFilters(),
    ef_search: int = DEFAULT_EF_SEARCH,
) -> list[SearchHit]:
    query, params = vector_query(model, filters)
    params.update(vector=Vector(np.asarray(vector, dtype=np.float32)), limit=limit)
    with conn.transaction():
        # The index returns at most ef_search candidates unless it scans on.
        ef = min(max(ef_search, limit), MAX_EF_SEARCH)
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
        if not filters.empty and supports_iterative_scan(conn):
            conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
        rows = conn.execute(query, params).fetchall()
    hits = []
    for rank, row in enumerate(rows, 1):
        similarity = 1.0 - float(row[-1])  # the last column is the cosine distance
        hits.append(_hit(row, "vector", rank, similarity, similarity=similarity))
    return hits


def _hit(
    row: Sequence[Any], mode: str, rank: int, score: float, *, similarity: float | None = None
) -> SearchHit:
    """A hit from a search query's row: chunk id, source, path, namespace, title, headings, content, …"""
    chunk_id, source, path, namespace, title, headings, content = row[:7]
    return SearchHit(
        int(chunk_id),
        source,
        path,
        namespace,
        title,
        tuple(headings),
        content,
        score=score,
        similarity=similarity,
        ranks=((mode, rank),),
    )


def supports_iterative_scan(conn: Connection) -> bool:
    """pgvector 0.8 added `hnsw.iterative_scan`, which keeps a filtered scan going to the limit."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        return False
    numbers = tuple(int(part) for part in re.findall(r"\d+", str(row[0]))[:2])
    return numbers >= (0, 8)


def similarities(
    conn: Connection, model: EmbeddingModel, vector: QueryVector, chunk_ids: Sequence[int]
) -> dict[int, float]:
    """Cosine similarity of the given chunks to the query vector (chunks not embedded left out)."""
    query = sql.SQL(
        "SELECT id, 1 - ({column} <=> %s::{type}) FROM chunks WHERE id = ANY(%s) AND {column} IS NOT NULL"
    ).format(column=sql.Identifier(model.column_name), type=model.column_type)
    rows = conn.execute(query, (Vector(np.asarray(vector, dtype=np.float32)), list(chunk_ids)))
    return {int(chunk_id): float(similarity) for chunk_id, similarity in rows}


# --- lexical ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CorpusStats:
    """What BM25 needs about the whole table: its size and the mean chunk length."""

    chunks: int
    mean_tokens: float


def corpus_stats(conn: Connection) -> CorpusStats:
    row = conn.execute("SELECT count(*), coalesce(avg(token_count), 0) FROM chunks").fetchone()
    assert row is not None
    return CorpusStats(int(row[0]), float(row[1]))


@dataclass(frozen=True, slots=True)
class QueryTerm:
    lexeme: str
    chunks: int
    """How many chunks hold the term (its document frequency)."""

    @property
    def tsquery(self) -> str:
        return tsquery_term(self.lexeme)

    def idf(self, total: int) -> float:
        """BM25's inverse document frequency, never negative."""
        return math.log(1 + (total - self.chunks + 0.5) / (self.chunks + 0.5))


def tsquery_term(lexeme: str) -> str:
    """One lexeme as tsquery input: quoted, so no character in it is read as an operator."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def query_lexemes(conn: Connection, text: str) -> list[str]:
    """The query's terms as the `tsv` column stores them (stop words dropped)."""
    rows = conn.execute(
        sql.SQL("SELECT lexeme FROM unnest(to_tsvector({}::regconfig, %s)) ORDER BY lexeme").format(
            sql.Literal(_LEXICAL_CONFIG)
        ),
        (text,),
    )
    return [str(row[0]) for row in rows]


def query_terms(conn: Connection, text: str) -> list[QueryTerm]:
    """The query's terms with their document frequency (counted through the GIN index)."""
    lexemes = query_lexemes(conn, text)
    if not lexemes:
        return []
    rows = conn.execute(
        "SELECT t.lexeme, (SELECT count(*) FROM chunks c WHERE c.tsv @@ t.query)"
        " FROM unnest(%s::text[], %s::tsquery[]) AS t (lexeme, query)",
        (lexemes, [tsquery_term(lexeme) for lexeme in lexemes]),
    )
    return [QueryTerm(str(lexeme), int(count)) for lexeme, count in rows]


def match_terms(terms: Sequence[QueryTerm], budget: int = MATCH_BUDGET) -> list[QueryTerm]:
    """The terms a chunk must hold one of to be scored: the rarest first, while their summed
    frequency stays within `budget` (the rarest always). Common terms still add to the score
    of the chunks scored; past the budget they only stop widening the set scored."""
    present = sorted((t for t in terms if t.chunks > 0), key=lambda t: (t.chunks, t.lexeme))
    chosen: list[QueryTerm] = []
    rows = 0
    for term in present:
        if chosen and rows + term.chunks > budget:
            break
        chosen.append(term)
        rows += term.chunks
    return chosen


_BM25_QUERY = """
WITH terms AS (
    SELECT * FROM unnest({lexemes}::text[], {idf}::float8[]) AS t (lexeme, idf)
),
matched AS MATERIALIZED (
    SELECT {columns}, c.tsv, c.token_count
    FROM chunks c JOIN documents d ON d.id = c.document_id
    WHERE c.tsv @@ {match}::tsquery AND {where}
),
occurrences AS (
    SELECT m.id, m.token_count, e.lexeme,
           sum(CASE w WHEN 'A' THEN {wa} WHEN 'B' THEN {wb} ELSE {wc} END)::float8 AS tf
    FROM matched m
    CROSS JOIN LATERAL unnest(m.tsv) e
    CROSS JOIN LATERAL unnest(e.weights) w
    WHERE e.lexeme = ANY({lexemes}::text[])
    GROUP BY m.id, m.token_count, e.lexeme
),
scored AS (
    SELECT o.id, sum(
        t.idf * o.tf * ({k1} + 1) / (o.tf + {k1} * (1 - {b} + {b} * o.token_count / {mean}))
    ) AS score
    FROM occurrences o JOIN terms t ON t.lexeme = o.lexeme
    GROUP BY o.id
)
SELECT m.id, m.source, m.path, m.namespace, m.title, m.heading_path, m.content, s.score
FROM scored s JOIN matched m ON m.id = s.id
ORDER BY s.score DESC, m.id
LIMIT {limit}
"""


def lexical_query(filters: SearchFilters) -> tuple[sql.Composed, dict[str, Any]]:
    """BM25 over the chunks holding a match term; occurrences in title and headings count more."""
    where, params = filter_clause(filters)
    query = sql.SQL(_BM25_QUERY).format(
        columns=_HIT_COLUMNS,
        where=where,
        lexemes=sql.Placeholder("lexemes"),
        idf=sql.Placeholder("idf"),
        match=sql.Placeholder("match"),
        mean=sql.Placeholder("mean"),
        limit=sql.Placeholder("limit"),
        k1=sql.Literal(BM25_K1),
        b=sql.Literal(BM25_B),
        wa=sql.Literal(FIELD_WEIGHTS["A"]),
        wb=sql.Literal(FIELD_WEIGHTS["B"]),
        wc=sql.Literal(FIELD_WEIGHTS["C"]),
    )
    return query, params


def lexical_search(
    conn: Connection,
    text: str,
    *,
    limit: int,
    filters: SearchFilters = SearchFilters(),
    stats: CorpusStats | None = None,
) -> list[SearchHit]:
    """Chunks holding the query's terms, best BM25 first (ties by chunk id)."""
    terms = query_terms(conn, text)
    matching = match_terms(terms)
    if not matching:
        return []
    stats = stats or corpus_stats(conn)
    query, params = lexical_query(filters)
    params.update(
        lexemes=[t.lexeme for t in terms],
        idf=[t.idf(stats.chunks) for t in terms],
        match=" | ".join(t.tsquery for t in matching),
        mean=max(stats.mean_tokens, 1.0),
        limit=limit,
    )
    rows = conn.execute(query, params).fetchall()
    return [_hit(row, "lexical", rank, float(row[-1])) for rank, row in enumerate(rows, 1)]


# --- hybrid -------------------------------------------------------------------------

Fetch = Callable[[int], list[SearchHit]]
"""One mode's best chunks, as many as the limit asks (fewer when the mode runs out)."""


class SearchInputs(TypedDict, total=False):
    """What a search may be given besides its text and options."""

    filters: SearchFilters
    model: EmbeddingModel | None
    """The embedding column; vector and hybrid modes need it."""
    vector: QueryVector | None
    """The query's vector in that column."""
    stats: CorpusStats | None
    """BM25's corpus statistics, when the caller already read them."""


def mode_fetchers(
    conn: Connection, text: str, options: SearchOptions, inputs: SearchInputs
) -> dict[str, Fetch]:
    """The lists the mode reads (hybrid: vector and lexical), each held to `min_score`."""
    filters = inputs.get("filters", SearchFilters())
    model, vector, stats = inputs.get("model"), inputs.get("vector"), inputs.get("stats")
    fetchers: dict[str, Fetch] = {}
    if options.mode in ("lexical", "hybrid"):

        def lexical(limit: int) -> list[SearchHit]:
            hits = lexical_search(conn, text, limit=limit, filters=filters, stats=stats)
            if options.min_score is None or options.mode == "lexical":
                return hits
            assert model is not None and vector is not None
            return _lexical_above(conn, model, vector, hits, options.min_score)

        fetchers["lexical"] = lexical
    if options.mode in ("vector", "hybrid"):
        if model is None or vector is None:
            raise SearchError(f"{options.mode} search needs an embedding model and the query's vector")

        def semantic(limit: int) -> list[SearchHit]:
            hits = vector_search(
                conn, model, vector, limit=limit, filters=filters, ef_search=options.ef_search
            )
            floor = options.min_score
            return hits if floor is None else [hit for hit in hits if (hit.similarity or 0.0) >= floor]

        fetchers["vector"] = semantic
    return fetchers


def fill_pages(fetch: Fetch, pages: int, start: int) -> list[SearchHit]:
    """A mode's best chunks down to the best chunk of its `pages`-th page, fetching more
    (twice as many each time, at most MAX_CANDIDATES) until that many pages are in."""
    limit = min(max(start, pages), MAX_CANDIDATES)
    while True:
        hits = fetch(limit)
        if len(hits) < limit or count_pages(hits) >= pages or limit >= MAX_CANDIDATES:
            return until_pages(hits, pages)
        limit = min(limit * 2, MAX_CANDIDATES)


def _lexical_above(
    conn: Connection, model: EmbeddingModel, vector: Any, hits: Sequence[SearchHit], floor: float
) -> list[SearchHit]:
    """Lexical hits whose cosine similarity to the query reaches the floor, similarity filled in."""
    known = similarities(conn, model, vector, [hit.chunk_id for hit in hits])
    return [
        replace(hit, similarity=known[hit.chunk_id])
        for hit in hits
        if hit.chunk_id in known and known[hit.chunk_id] >= floor
    ]


# --- one entry point ----------------------------------------------------------------


def search(
    conn: Connection, text: str, *, options: SearchOptions, **inputs: Unpack[SearchInputs]
) -> list[SearchHit]:
    """The top `options.k` chunks in the chosen mode. Vector and hybrid need the model and the
    query vector. Hybrid fuses each mode's best `depth` chunks."""
    check_query(text)
    fetchers = mode_fetchers(conn, text, options, inputs)
    if options.mode != "hybrid":
        return fetchers[options.mode](options.k)
    depth = max(options.depth, options.k)
    lists = {mode: fetch(depth) for mode, fetch in fetchers.items()}
    weights = fusion_weights(text, options.identifier_weight)
    return fuse_rrf(lists, k=options.rrf_k, weights=weights, limit=options.k)


def search_pages(
    conn: Connection, text: str, *, options: SearchOptions, **inputs: Unpack[SearchInputs]
) -> list[PageHit]:
    """The top `options.k` pages, each once at the rank of its best chunk. Hybrid fuses the
    page ranks of each mode's best `depth` pages (Reciprocal Rank Fusion of pages)."""
    check_query(text)
    fetchers = mode_fetchers(conn, text, options, inputs)
    pages = options.k if options.mode != "hybrid" else max(options.depth, options.k)
    lists = {mode: fill_pages(fetch, pages, options.depth) for mode, fetch in fetchers.items()}
    if options.mode != "hybrid":
        return group_pages(lists[options.mode], options.mode)[: options.k]
    weights = fusion_weights(text, options.identifier_weight)
    return fuse_pages(lists, k=options.rrf_k, weights=weights, limit=options.k)


def search_any(
    conn: Connection, text: str, *, options: SearchOptions, **inputs: Unpack[SearchInputs]
) -> list[SearchHit] | list[PageHit]:
    """`search` or `search_pages`, as `options.group_by` says."""
    run = search_pages if options.group_by == "page" else search
    return run(conn, text, options=options, **inputs)


@dataclass(frozen=True, slots=True)
class SearchResult:
    query: str
    options: SearchOptions
    filters: SearchFilters
    model: str | None
    hits: Sequence[SearchHit | PageHit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "mode": self.options.mode,
            "model": self.model,
            "k": self.options.k,
            "group_by": self.options.group_by,
            "min_score": self.options.min_score,
            "namespace": self.filters.namespace,
            "where": dict(self.filters.where),
            "results": [{"rank": rank, **hit.to_dict()} for rank, hit in enumerate(self.hits, 1)],
        }


def format_hits(result: SearchResult, *, width: int = 160) -> str:
    if not result.hits:
        return f"no results for {result.query!r} ({result.options.mode})"
    lines = []
    for rank, hit in enumerate(result.hits, 1):
        snippet = " ".join(hit.content.split())
        if len(snippet) > width:
            snippet = snippet[: width - 1] + "…"
        lines.append(f"{rank:>2}. {_format_score(hit.score)}  {hit.citation.label()}")
        lines.append(f"    {snippet}")
        if isinstance(hit, PageHit):
            lines += [f"    also {chunk.citation.label()}" for chunk in hit.chunks[1:]]
    return "\n".join(lines)


def _format_score(score: float) -> str:
    return f"{score:.4f}" if math.isfinite(score) else str(score)
