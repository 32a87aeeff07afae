"""Prepare the changed documents, streamed in steps: chunk, look up the cache, embed, stage.

Each step holds at most `stream_batch_chunks` chunks, so memory stays flat
however large the corpus. Vectors go to the cache as each embedding batch
returns; the staging tables get the chunk rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from config.settings import Settings
from tasks.cache import cached_hashes, write_vectors
from tasks.chunk import chunk_document
from tasks.db import Connection
from tasks.discover import DocumentError, read_document
from tasks.embed import Embedder, EmbedItem, EmbedPolicy, EmbedStats, RateBudget, Vectors, embed_items
from tasks.load import stage_documents
from tasks.records import Chunk, FileFailure, FoundFile, ParsedDocument
from tasks.registry import EmbeddingModel

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Step = list[tuple[ParsedDocument, list[Chunk]]]


@dataclass(slots=True)
class PrepareStats:
    documents: int = 0
    chunks: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    failures: list[FileFailure] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    """Paths whose frontmatter says `rag_include: false`."""
    empty: list[FileFailure] = field(default_factory=list)
    """Pages stored without chunks because they hold no text, with the reason."""
    embed: EmbedStats = field(default_factory=EmbedStats)
    chunk_seconds: float = 0.0
    cache_seconds: float = 0.0
    stage_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """A live model column and the embedder that fills it."""

    model: EmbeddingModel
    embedder: Embedder


def chunk_cap(settings: Settings, targets: Sequence[ModelTarget]) -> int:
    """The headings chunker's cap: the setting, never above any live model's input limit."""
    return min([settings.chunk_max_tokens, *(t.embedder.max_input_tokens for t in targets)])


def prepare_changes(
    files: Sequence[FoundFile],
    *,
    stage_conn: Connection,
    cache_conn: Connection,
    targets: Sequence[ModelTarget],
    settings: Settings,
    progress: Progress | None = None,
) -> PrepareStats:
    return asyncio.run(
        _prepare(
            files,
            stage_conn=stage_conn,
            cache_conn=cache_conn,
            targets=targets,
            settings=settings,
            progress=progress,
        )
    )


async def _prepare(
    files: Sequence[FoundFile],
    *,
    stage_conn: Connection,
    cache_conn: Connection,
    targets: Sequence[ModelTarget],
    settings: Settings,
    progress: Progress | None,
) -> PrepareStats:
    stats = PrepareStats()
    cap = chunk_cap(settings, targets)
    budgets = {
        t.model.slug: RateBudget(settings.requests_per_minute, settings.tokens_per_minute) for t in targets
    }
    step: Step = []
    step_chunks = 0
    for done, found in enumerate(files, start=1):
        started = time.perf_counter()
        prepared = _read_and_chunk(found, settings, cap, stats)
        stats.chunk_seconds += time.perf_counter() - started
        if prepared is not None:
            step.append(prepared)
            step_chunks += len(prepared[1])
        if step_chunks >= settings.stream_batch_chunks:
            await _flush(step, stage_conn, cache_conn, targets, settings, budgets, stats)
            step, step_chunks = [], 0
        if progress is not None:
            progress(done, len(files))
    if step:
        await _flush(step, stage_conn, cache_conn, targets, settings, budgets, stats)
    return stats


def _read_and_chunk(
    found: FoundFile, settings: Settings, cap: int, stats: PrepareStats
) -> tuple[ParsedDocument, list[Chunk]] | None:
    try:
        doc = read_document(found, max_bytes=settings.max_file_bytes)
    except DocumentError as exc:
        log.warning("skipping %s: %s", exc.path, exc.reason)
        stats.failures.append(FileFailure(exc.path, exc.reason))
        return None
    if not doc.include:
        stats.excluded.append(doc.path)
        return None
    chunks = chunk_document(
        doc,
        chunker=settings.chunker,
        max_tokens=cap,
        size=min(settings.token_window, cap),
        overlap=settings.token_overlap,
    )
    stats.documents += 1
    stats.chunks += len(chunks)
    if not chunks:
        stats.empty.append(FileFailure(doc.path, f"{_why_empty(doc)}: stored without chunks"))
    return doc, chunks


def _why_empty(doc: ParsedDocument) -> str:
    if doc.body.strip():
        return "headings only, no text"
    return "frontmatter only" if doc.frontmatter else "empty page"


async def _flush(
    step: Step,
    stage_conn: Connection,
    cache_conn: Connection,
    targets: Sequence[ModelTarget],
    settings: Settings,
    budgets: dict[str, RateBudget],
    stats: PrepareStats,
) -> None:
    unique: dict[bytes, EmbedItem] = {}
    for _, chunks in step:
        for chunk in chunks:
            unique.setdefault(
                chunk.embed_hash, EmbedItem(chunk.embed_hash, chunk.embed_text, chunk.token_count)
            )
    for target in targets:
        started = time.perf_counter()
        hits = cached_hashes(cache_conn, target.embedder.model_key, list(unique))
        stats.cache_seconds += time.perf_counter() - started
        misses = [item for digest, item in unique.items() if digest not in hits]
        stats.cache_hits += len(unique) - len(misses)
        stats.cache_misses += len(misses)
        if misses:
            await embed_items(
                target.embedder,
                misses,
                EmbedPolicy.from_settings(settings, target.embedder),
                _cache_writer(cache_conn, target.embedder.model_key),
                stats=stats.embed,
                budget=budgets[target.model.slug],
            )
    started = time.perf_counter()
    stage_documents(stage_conn, step)
    stats.stage_seconds += time.perf_counter() - started


def _cache_writer(conn: Connection, model_key: str) -> Callable[[Sequence[bytes], Vectors], None]:
    def write(hashes: Sequence[bytes], vectors: Vectors) -> None:
        write_vectors(conn, model_key, hashes, vectors)

    return write
