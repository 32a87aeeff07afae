"""Embedding: one place for batching, concurrency and retry, over the providers in `tasks.providers`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from config.settings import Settings
from tasks.providers import PROVIDER_NAMES, ProviderName, make_embedder
from tasks.providers.base import (
    Embedder,
    EmbeddingError,
    SelfTruncating,
    TerminalEmbeddingError,
    TransientEmbeddingError,
    Vectors,
    count_cl100k,
    truncate_tokens,
)
from tasks.providers.hash import HashEmbedder, hash_vector
from tasks.providers.local import SentenceTransformerEmbedder, local_model_path
from tasks.providers.openai import OpenAIEmbedder, retry_after_seconds

__all__ = [
    "PROVIDER_NAMES",
    "EmbedItem",
    "EmbedPolicy",
    "EmbedStats",
    "Embedder",
    "EmbeddingError",
    "HashEmbedder",
    "OpenAIEmbedder",
    "ProviderName",
    "RateBudget",
    "SentenceTransformerEmbedder",
    "TerminalEmbeddingError",
    "TransientEmbeddingError",
    "Vectors",
    "count_cl100k",
    "embed_items",
    "hash_vector",
    "local_model_path",
    "make_embedder",
    "plan_batches",
    "retry_after_seconds",
    "truncate_tokens",
]

log = logging.getLogger(__name__)

OnBatch = Callable[[Sequence[bytes], Vectors], None]


# --- batching, concurrency, retry -------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbedItem:
    embed_hash: bytes
    text: str
    token_count: int


@dataclass(slots=True)
class EmbedStats:
    embedded: int = 0
    tokens: int = 0
    truncated: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0

    def add(self, other: EmbedStats) -> None:
        """Fold another stage's (or shard's) figures into these."""
        for name in ("embedded", "tokens", "truncated", "batches", "retries", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True, slots=True)
class EmbedPolicy:
    batch_inputs: int
    batch_tokens: int
    concurrency: int
    max_attempts: int
    max_backoff: float
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrency_limit: str | None = None
    """A Prefect global concurrency limit each request holds while in flight, shared by every flow."""
    rate_limit: str | None = None
    """A Prefect global concurrency limit with slot decay; each request takes one slot."""

    @classmethod
    def from_settings(cls, settings: Settings, embedder: Embedder) -> EmbedPolicy:
        return cls(
            batch_inputs=min(batch_inputs(settings, embedder), embedder.max_batch_inputs),
            batch_tokens=settings.embed_batch_tokens,
            concurrency=min(settings.embed_concurrency, embedder.max_concurrency),
            max_attempts=settings.embed_max_attempts,
            max_backoff=settings.embed_max_backoff_seconds,
            requests_per_minute=settings.requests_per_minute,
            tokens_per_minute=settings.tokens_per_minute,
            concurrency_limit=settings.embed_concurrency_limit,
            rate_limit=settings.embed_rate_limit,
        )


def batch_inputs(settings: Settings, embedder: Embedder) -> int:
    """Texts per provider call: the setting where it was given, else the provider's own default."""
    if "embed_batch_inputs" in settings.model_fields_set:
        return settings.embed_batch_inputs
    default = getattr(embedder, "default_batch_inputs", None)
    return int(default) if isinstance(default, int) else settings.embed_batch_inputs


def plan_batches(items: Sequence[EmbedItem], *, max_inputs: int, max_tokens: int) -> list[range]:
    """Consecutive index ranges, each within both the input and the token bound."""
    batches: list[range] = []
    start, tokens_in_batch = 0, 0
    for i, item in enumerate(items):
        full = i - start >= max_inputs or (i > start and tokens_in_batch + item.token_count > max_tokens)
        if full:
            batches.append(range(start, i))
            start, tokens_in_batch = i, 0
        tokens_in_batch += item.token_count
    if start < len(items):
        batches.append(range(start, len(items)))
    return batches


class RateBudget:
    """Requests and tokens per minute, refilled continuously, shared by a run's batches."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self._limits = (requests_per_minute, tokens_per_minute)
        self._levels = [float(limit or 0) for limit in self._limits]
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, token_count: int) -> None:
        costs = (1.0, float(token_count))
        async with self._lock:
            while True:
                self._refill()
                waits = [
                    (min(cost, limit) - level) * 60.0 / limit
                    for cost, level, limit in zip(costs, self._levels, self._limits, strict=True)
                    if limit and level < min(cost, limit)
                ]
                if not waits:
                    break
                await asyncio.sleep(max(waits))
            for i, (cost, limit) in enumerate(zip(costs, self._limits, strict=True)):
                if limit:
                    self._levels[i] -= min(cost, limit)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self._stamp = now - self._stamp, now
        for i, limit in enumerate(self._limits):
            if limit:
                self._levels[i] = min(float(limit), self._levels[i] + elapsed * limit / 60.0)


def _wait_for(policy: EmbedPolicy) -> Callable[[RetryCallState], float]:
    backoff = wait_random_exponential(multiplier=0.5, max=policy.max_backoff)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientEmbeddingError) and exc.retry_after is not None:
            return min(exc.retry_after, policy.max_backoff)
        return float(backoff(state))

    return wait


async def embed_items(
    embedder: Embedder,
    items: Sequence[EmbedItem],
    policy: EmbedPolicy,
    on_batch: OnBatch,
    *,
    stats: EmbedStats | None = None,
    budget: RateBudget | None = None,
) -> EmbedStats:
    """Embed `items` in bounded batches, N at once; hand each finished batch to `on_batch`.

    `on_batch` runs as soon as a batch returns (the cache write), so a crash never
    pays for a batch twice. A terminal error cancels the batches still in flight.
    """
    stats = stats if stats is not None else EmbedStats()
    budget = budget or RateBudget(policy.requests_per_minute, policy.tokens_per_minute)
    semaphore = asyncio.Semaphore(policy.concurrency)
    started = time.perf_counter()

    async def run_batch(batch: range) -> None:
        batch_tokens = sum(items[i].token_count for i in batch)
        async with semaphore:
            texts = _prepared(embedder, [items[i].text for i in batch], stats)
            await budget.acquire(batch_tokens)
            vectors = await _embed_with_retry(embedder, texts, policy, stats, batch)
        on_batch([items[i].embed_hash for i in batch], vectors)
        stats.embedded += len(batch)
        stats.tokens += batch_tokens
        stats.batches += 1

    batches = plan_batches(items, max_inputs=policy.batch_inputs, max_tokens=policy.batch_tokens)
    try:
        async with asyncio.TaskGroup() as group:
            for batch in batches:
                group.create_task(run_batch(batch))
    except ExceptionGroup as group_error:
        raise _first_error(group_error) from None
    finally:
        stats.seconds += time.perf_counter() - started
    return stats


async def _embed_with_retry(
    embedder: Embedder, texts: list[str], policy: EmbedPolicy, stats: EmbedStats, batch: range
) -> Vectors:
    def count_retry(state: RetryCallState) -> None:
        stats.retries += 1
        log.warning(
            "embedding batch %d-%d failed (%s); attempt %d of %d",
            batch.start,
            batch.stop - 1,
            state.outcome.exception() if state.outcome else "?",
            state.attempt_number,
            policy.max_attempts,
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, EmbeddingError) and exc.retryable),
        stop=stop_after_attempt(policy.max_attempts),
        wait=_wait_for(policy),
        before_sleep=count_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async with prefect_limits(policy):
                    vectors = await _embed_once(embedder, texts, stats)
                return _checked(vectors, embedder, batch)
    except EmbeddingError as exc:
        exc.batch = (batch.start, batch.stop - 1)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def _prepared(embedder: Embedder, texts: list[str], stats: EmbedStats) -> list[str]:
    """The texts to send, cut to fit where the provider does not cut (and count) them itself.

    Done per batch as it starts, so the first requests go out at once and the rest
    are prepared while they are in flight.
    """
    if isinstance(embedder, SelfTruncating):
        return texts
    prepared = [embedder.prepare(text) for text in texts]
    stats.truncated += sum(truncated for _, truncated in prepared)
    return [text for text, _ in prepared]


@asynccontextmanager
async def prefect_limits(policy: EmbedPolicy) -> AsyncIterator[None]:
    """Hold the Prefect global limits the policy names for one request; nothing when none is named.

    The limits must exist on the Prefect server (`prefect gcl create NAME --limit N`,
    with `--slot-decay-per-second` for a rate limit): a missing one fails the run.
    """
    if policy.rate_limit is not None:
        from prefect.concurrency.asyncio import rate_limit

        await rate_limit(policy.rate_limit, strict=True)
    if policy.concurrency_limit is None:
        yield
        return
    from prefect.concurrency.asyncio import concurrency

    async with concurrency(policy.concurrency_limit, strict=True):
        yield


async def _embed_once(embedder: Embedder, texts: list[str], stats: EmbedStats) -> Vectors:
    if isinstance(embedder, SelfTruncating):
        vectors, truncated = await embedder.embed_counting_truncated(texts)
        stats.truncated += truncated
        return vectors
    return await embedder.embed(texts)


def _checked(vectors: Vectors, embedder: Embedder, batch: range) -> Vectors:
    if vectors.shape != (len(batch), embedder.dimensions):
        raise TerminalEmbeddingError(
            f"expected {len(batch)} vectors of {embedder.dimensions} dimensions, got shape {vectors.shape}",
            model_key=embedder.model_key,
            batch=(batch.start, batch.stop - 1),
        )
    return vectors


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error that matters from a task group: terminal before transient."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    leaves.sort(key=lambda error: isinstance(error, EmbeddingError) and error.retryable)
    return leaves[0]
