"""Ranking without I/O: hits and their citations, Reciprocal Rank Fusion, and pages from chunks.

A chunk-level result lists chunks; a page-level result lists each page once, at
the rank of its best chunk, with the page's matching chunks as its citations.
Hybrid search over pages fuses the page ranks of each mode, not the chunk
ranks, so a page is not carried up by several of its chunks each counting apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

GroupBy = Literal["chunk", "page"]
GROUPINGS: tuple[GroupBy, ...] = ("chunk", "page")
DEFAULT_RRF_K = 60
PageKey = tuple[str, str]
"""(source, path): what makes a page one page."""


@dataclass(frozen=True, slots=True)
class Citation:
    """Where a hit comes from, enough to quote it and to find it again."""

    path: str
    title: str
    heading_path: tuple[str, ...]
    chunk_id: int
    score: float

    def label(self) -> str:
        place = " > ".join(self.heading_path)
        return f"{self.path}" + (f" > {place}" if place else "") + f" [chunk {self.chunk_id}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "title": self.title,
            "heading_path": list(self.heading_path),
            "chunk_id": self.chunk_id,
            "score": self.score,
            "label": self.label(),
        }


@dataclass(frozen=True, slots=True)
class SearchHit:
    chunk_id: int
    source: str
    path: str
    namespace: str
    title: str
    heading_path: tuple[str, ...]
    content: str
    score: float
    """vector: cosine similarity; lexical: BM25; hybrid: the fused RRF score."""
    similarity: float | None = None
    """Cosine similarity to the query, where a vector took part."""
    ranks: tuple[tuple[str, int], ...] = ()
    """The hit's 1-based rank in each mode's list."""

    @property
    def page(self) -> PageKey:
        return (self.source, self.path)

    @property
    def citation(self) -> Citation:
        return Citation(self.path, self.title, self.heading_path, self.chunk_id, self.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "source": self.source,
            "path": self.path,
            "namespace": self.namespace,
            "title": self.title,
            "heading_path": list(self.heading_path),
            "score": self.score,
            "similarity": self.similarity,
            "ranks": dict(self.ranks),
            "content": self.content,
            "citation": self.citation.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class PageHit:
    """One page: its best chunk (carrying the page's score and ranks) and its matching chunks."""

    best: SearchHit
    chunks: tuple[SearchHit, ...]
    """The page's chunks among the candidates, best first, each with its own chunk-level score."""

    @property
    def path(self) -> str:
        return self.best.path

    @property
    def score(self) -> float:
        return self.best.score

    @property
    def content(self) -> str:
        return self.best.content

    @property
    def citation(self) -> Citation:
        return self.best.citation

    def to_dict(self) -> dict[str, Any]:
        """The best chunk's hit keys (score and ranks are the page's), then the page's citations."""
        return {
            **self.best.to_dict(),
            "group_by": "page",
            "citations": [chunk.citation.to_dict() for chunk in self.chunks],
        }


# --- pages ----------------------------------------------------------------------------


def count_pages(hits: Iterable[SearchHit]) -> int:
    return len({hit.page for hit in hits})


def until_pages(hits: Sequence[SearchHit], pages: int) -> list[SearchHit]:
    """The hits down to the best chunk of the `pages`-th page: what ranks those pages, and no more."""
    seen: set[PageKey] = set()
    for index, hit in enumerate(hits):
        seen.add(hit.page)
        if len(seen) == pages:
            return list(hits[: index + 1])
    return list(hits)


def group_pages(hits: Sequence[SearchHit], mode: str | None = None) -> list[PageHit]:
    """Chunks (best first) as pages, each at the rank of its best chunk and scored by it.

    With `mode`, each page's ranks become its rank among the pages of that mode's list.
    """
    members: dict[PageKey, list[SearchHit]] = {}
    for hit in hits:
        members.setdefault(hit.page, []).append(hit)
    pages = []
    for rank, chunks in enumerate(members.values(), start=1):
        best = chunks[0] if mode is None else replace(chunks[0], ranks=((mode, rank),))
        pages.append(PageHit(best, tuple(chunks)))
    return pages


def fuse_pages(
    ranked: Mapping[str, Sequence[SearchHit]],
    *,
    k: int = DEFAULT_RRF_K,
    weights: Mapping[str, float] | None = None,
    limit: int | None = None,
) -> list[PageHit]:
    """Reciprocal Rank Fusion of the page ranks of each mode's chunk list.

    Each mode's list is first grouped into pages (a page at the rank of its best
    chunk), then every page gets weight / (k + page rank) from each list. Ties go
    to the better best page rank, then to the lower page key. A page's citations
    are its chunks in the order of their own chunk-level fusion.
    """
    scores: dict[PageKey, float] = {}
    ranks: dict[PageKey, dict[str, int]] = {}
    for mode in sorted(ranked):
        weight = 1.0 if weights is None else weights.get(mode, 1.0)
        for rank, page in enumerate(group_pages(ranked[mode]), start=1):
            key = page.best.page
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
            ranks.setdefault(key, {})[mode] = rank
    members: dict[PageKey, list[SearchHit]] = {}
    for hit in fuse_rrf(ranked, k=k, weights=weights):
        members.setdefault(hit.page, []).append(hit)
    order = sorted(scores, key=lambda key: (-round(scores[key], 12), min(ranks[key].values()), key))
    pages = [
        PageHit(
            replace(members[key][0], score=scores[key], ranks=tuple(sorted(ranks[key].items()))),
            tuple(members[key]),
        )
        for key in order
    ]
    return pages if limit is None else pages[:limit]


# --- chunks ---------------------------------------------------------------------------


def fuse_rrf(
    ranked: Mapping[str, Sequence[SearchHit]],
    *,
    k: int = DEFAULT_RRF_K,
    weights: Mapping[str, float] | None = None,
    limit: int | None = None,
) -> list[SearchHit]:
    """Reciprocal Rank Fusion: each list adds weight / (k + rank) to the chunks it holds.

    Ties go to the chunk with the better best rank in any list, then to the lower
    chunk id, so the same lists always fuse to the same order.
    """
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    hits: dict[int, SearchHit] = {}
    for mode in sorted(ranked):
        weight = 1.0 if weights is None else weights.get(mode, 1.0)
        for rank, hit in enumerate(ranked[mode], start=1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + weight / (k + rank)
            ranks.setdefault(hit.chunk_id, {})[mode] = rank
            known = hits.get(hit.chunk_id)
            if known is None or (known.similarity is None and hit.similarity is not None):
                hits[hit.chunk_id] = hit
    order = sorted(scores, key=lambda cid: (-round(scores[cid], 12), min(ranks[cid].values()), cid))
    fused = [replace(hits[cid], score=scores[cid], ranks=tuple(sorted(ranks[cid].items()))) for cid in order]
    return fused if limit is None else fused[:limit]


_IDENTIFIER = re.compile(
    r"""
      `[^`\s][^`]*`                          # anything in backticks
    | \b[A-Za-z_]\w*(?:(?:\.|::|->)\w+)+     # dotted or scoped: tasks.embed, std::vec
    | \b\w*[A-Za-z]\w*_\w*                   # snake_case, _private
    | \b[a-z]+[A-Z]\w*                       # camelCase
    | \b\w+\(\)                              # call()
    | (?<![\w-])--?[A-Za-z][\w-]*            # a command-line flag
    | \b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z\d]+(?:-[A-Za-z\d]+)*\b  # letters and digits: E0382, gpt-4o
    """,
    re.VERBOSE,
)


def looks_like_identifier(query: str) -> bool:
    """Whether the query names something exact (code, a flag, an error code, a model name)."""
    return _IDENTIFIER.search(query) is not None


def fusion_weights(query: str, identifier_weight: float) -> dict[str, float]:
    lexical = identifier_weight if looks_like_identifier(query) else 1.0
    return {"vector": 1.0, "lexical": lexical}
