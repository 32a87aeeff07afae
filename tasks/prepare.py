"""Prepare: split the changed files into shards, and prepare each shard on its own.

A shard reads its files, chunks them, looks the embed texts up in the cache,
embeds only the misses (each batch goes to the cache as it returns), and COPYs
its rows into the run-keyed staging tables. It opens its own connections and
starts by clearing what an earlier attempt of the same shard staged, so it can
be retried or rescheduled on any machine. Within a shard, files are streamed in
steps of at most `stream_batch_chunks` chunks, so memory stays flat.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from config.settings import ChunkerName, Settings
from tasks.cache import embed_missing
from tasks.chunk import chunk_document
from tasks.db import Connection
from tasks.discover import DocumentError, read_document
from tasks.embed import Embedder, EmbedItem, EmbedPolicy, EmbedStats, RateBudget
from tasks.pool import ConnectionSource, process_pool
from tasks.providers.base import CL100K
from tasks.records import Chunk, FileFailure, FoundFile, ParsedDocument
from tasks.registry import EmbeddingModel
from tasks.staging import StagingTarget, clear_shard, stage_documents
from tasks.tokens import TokenCounter

log = logging.getLogger(__name__)

OVERSIZE = "a single word or line longer than the model's input limit; the model embeds its start only"
CHUNKER_VERSION = 1
"""Bumped when the chunkers' output changes, so stored documents are re-chunked once."""

Progress = Callable[[int, int], None]
"""(files done, chunks prepared) since the last call."""
EmbedderFor = Callable[[EmbeddingModel, Settings], Embedder]
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
    shard_seconds: list[float] = field(default_factory=list)
    """Wall time of each shard, as the shard measured it."""
    oversize: list[FileFailure] = field(default_factory=list)
    """Chunks over the model's input limit that could not be split: the model will cut them."""
    precision: str | None = None
    """The precision a local model ran at (fp32, bf16); None where no model ran."""

    def add(self, other: PrepareStats) -> None:
        """Fold a shard's statistics into the run's."""
        for name in ("documents", "chunks", "cache_hits", "cache_misses"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("chunk_seconds", "cache_seconds", "stage_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.excluded += other.excluded
        self.empty += other.empty
        self.oversize += other.oversize
        self.precision = self.precision or other.precision
        self.shard_seconds += other.shard_seconds
        self.embed.add(other.embed)


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """How a run chunks: recorded with every document, so a change re-chunks it."""

    chunker: ChunkerName
    max_tokens: int
    window: int
    overlap: int
    counter: str | None = None
    """The tokenizer that counts the cap, when it is not the chunker's own cl100k: that of the
    live model with the smallest input."""

    @property
    def signature(self) -> str:
        counted = f"/count={self.counter}" if self.counter else ""
        if self.chunker == "tokens":
            return f"tokens/v{CHUNKER_VERSION}/window={self.window}/overlap={self.overlap}{counted}"
        return f"headings/v{CHUNKER_VERSION}/cap={self.max_tokens}{counted}"

    def chunk(self, doc: ParsedDocument, counter: TokenCounter | None) -> list[Chunk]:
        """The page's chunks as this spec cuts them; `counter` is the `counter` tokenizer's count."""
        return chunk_document(
            doc,
            chunker=self.chunker,
            max_tokens=self.max_tokens,
            size=self.window,
            overlap=self.overlap,
            token_counter=counter,
        )


def chunk_spec(settings: Settings, embedders: Sequence[Embedder]) -> ChunkSpec:
    """The cap is the setting, never above any live model's input limit, counted in that model's tokens."""
    cap = min([settings.chunk_max_tokens, *(e.max_input_tokens for e in embedders)])
    tightest = min(embedders, key=lambda e: e.max_input_tokens, default=None)
    counter = tightest.tokenizer if tightest is not None and tightest.tokenizer != CL100K else None
    return ChunkSpec(settings.chunker, cap, min(settings.token_window, cap), settings.token_overlap, counter)


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of preparation: some files, and where their rows go."""

    files: tuple[FoundFile, ...]
    target: StagingTarget
    spec: ChunkSpec
    models: tuple[EmbeddingModel, ...]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def split_by_bytes(files: Sequence[FoundFile], target_bytes: int) -> list[list[FoundFile]]:
    """Consecutive groups of files of about `target_bytes` each (a larger file is a group alone)."""
    groups: list[list[FoundFile]] = []
    size = 0
    for found in files:
        if not groups or (size + found.size > target_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(found)
        size += found.size
    return groups


def plan_shards(
    files: Sequence[FoundFile],
    planned: Mapping[str, bytes],
    run_key: uuid.UUID,
    spec: ChunkSpec,
    models: Sequence[EmbeddingModel],
    target_bytes: int,
) -> list[Shard]:
    """The run's shards, numbered from 0; each carries only its own files' planned hashes."""
    shards = []
    for number, group in enumerate(split_by_bytes(files, target_bytes)):
        hashes = {f.path: planned[f.path] for f in group if f.path in planned}
        target = StagingTarget(run_key, number, spec.signature, hashes)
        shards.append(Shard(tuple(group), target, spec, tuple(models)))
    return shards


def prepare_shard(
    shard: Shard,
    settings: Settings,
    embedder_for: EmbedderFor,
    connections: ConnectionSource | None = None,
    progress: Progress | None = None,
) -> PrepareStats:
    """Prepare one shard end to end; safe to run again (it replaces its own staged rows)."""
    started = time.perf_counter()
    source = connections or process_pool(settings)
    embedders = [embedder_for(model, settings) for model in shard.models]
    with _two_connections(source) as (stage_conn, cache_conn):
        clear_shard(stage_conn, shard.target)
        stats = asyncio.run(_prepare(shard, settings, embedders, stage_conn, cache_conn, progress))
    stats.precision = next((p for e in embedders if (p := getattr(e, "precision", None))), None)
    stats.shard_seconds.append(time.perf_counter() - started)
    return stats


@contextmanager
def _two_connections(source: ConnectionSource) -> Iterator[tuple[Connection, Connection]]:
    with source.connection() as stage_conn, source.connection() as cache_conn:
        yield stage_conn, cache_conn


async def _prepare(
    shard: Shard,
    settings: Settings,
    embedders: Sequence[Embedder],
    stage_conn: Connection,
    cache_conn: Connection,
    progress: Progress | None,
) -> PrepareStats:
    stats = PrepareStats()
    budgets = [RateBudget(settings.requests_per_minute, settings.tokens_per_minute) for _ in embedders]
    reader = _Reader(settings, shard.spec, _counter(shard.spec, embedders), stats)
    step: Step = []
    step_chunks = 0  # kept as it grows: summing the step for every file is quadratic in its files
    try:
        for found in shard.files:
            prepared = reader.read_and_chunk(found)
            if prepared is not None:
                step.append(prepared)
                step_chunks += len(prepared[1])
            if step_chunks >= settings.stream_batch_chunks:
                await _flush(step, shard, settings, embedders, budgets, stage_conn, cache_conn, stats)
                step, step_chunks = [], 0
            if progress is not None:
                progress(1, len(prepared[1]) if prepared else 0)
        if step:
            await _flush(step, shard, settings, embedders, budgets, stage_conn, cache_conn, stats)
    finally:
        for embedder in embedders:
            await embedder.aclose()  # its client belongs to this event loop
    return stats


def _counter(spec: ChunkSpec, embedders: Sequence[Embedder]) -> TokenCounter | None:
    """The batched token count of the model the spec caps in."""
    return next((e.count_tokens for e in embedders if e.tokenizer == spec.counter), None)


@dataclass(slots=True)
class _Reader:
    """Reads and chunks one file at a time, adding to the shard's statistics."""

    settings: Settings
    spec: ChunkSpec
    counter: TokenCounter | None
    stats: PrepareStats

    def read_and_chunk(self, found: FoundFile) -> tuple[ParsedDocument, list[Chunk]] | None:
        started = time.perf_counter()
        try:
            doc = read_document(found, max_bytes=self.settings.max_file_bytes)
        except DocumentError as exc:
            log.warning("skipping %s: %s", exc.path, exc.reason)
            self.stats.failures.append(FileFailure(exc.path, exc.reason))
            return None
        finally:
            self.stats.chunk_seconds += time.perf_counter() - started
        if not doc.include:
            self.stats.excluded.append(doc.path)
            return None
        started = time.perf_counter()
        chunks = self._chunk(doc)
        self.stats.chunk_seconds += time.perf_counter() - started
        return doc, chunks

    def _chunk(self, doc: ParsedDocument) -> list[Chunk]:
        stats = self.stats
        chunks = self.spec.chunk(doc, self.counter)
        stats.documents += 1
        stats.chunks += len(chunks)
        stats.oversize += [
            FileFailure(doc.path, f"chunk {c.ordinal}: {OVERSIZE}") for c in chunks if c.oversize
        ]
        if not chunks:
            stats.empty.append(FileFailure(doc.path, f"{_why_empty(doc)}: stored without chunks"))
        return chunks


def _why_empty(doc: ParsedDocument) -> str:
    if doc.body.strip():
        return "headings only, no text"
    return "frontmatter only" if doc.frontmatter else "empty page"


async def _flush(
    step: Step,
    shard: Shard,
    settings: Settings,
    embedders: Sequence[Embedder],
    budgets: Sequence[RateBudget],
    stage_conn: Connection,
    cache_conn: Connection,
    stats: PrepareStats,
) -> None:
    unique: dict[bytes, EmbedItem] = {}
    for _, chunks in step:
        for chunk in chunks:
            unique.setdefault(
                chunk.embed_hash, EmbedItem(chunk.embed_hash, chunk.embed_text, chunk.token_count)
            )
    items = list(unique.values())
    for embedder, budget in zip(embedders, budgets, strict=True):
        policy = EmbedPolicy.from_settings(settings, embedder)
        found = await embed_missing(cache_conn, embedder, items, policy, budget, stats.embed)
        stats.cache_hits += found.hits
        stats.cache_misses += found.misses
        stats.cache_seconds += found.lookup_seconds
    started = time.perf_counter()
    stage_documents(stage_conn, shard.target, step)
    stats.stage_seconds += time.perf_counter() - started
