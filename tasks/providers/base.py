"""What every provider shares: the protocol, the vector type, the error classes and token helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from tasks import tokens

Vectors = npt.NDArray[np.float32]


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
    """Longest input the model takes, in its own tokens (chunks are capped to it)."""
    tokenizer: str
    """Names how `count_tokens` counts (`cl100k_base`, or the model's own vocabulary)."""
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


@runtime_checkable
class SelfTruncating(Protocol):
    """A model that truncates its own inputs and counts them from the one tokenization it runs."""

    async def embed_counting_truncated(self, texts: Sequence[str]) -> tuple[Vectors, int]:
        """The vectors, and how many of the texts were cut to fit the model."""
        ...


def truncate_tokens(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` cl100k tokens. A token is at least one byte, so short texts skip the encode."""
    if len(text) <= limit and len(text.encode()) <= limit:
        return text, False
    encoded = tokens.encode(text)
    if len(encoded) <= limit:
        return text, False
    return tokens.decode(encoded[:limit]), True


CL100K = "cl100k_base"
"""The chunker's own count: a model that counts this way needs no second count."""


def count_cl100k(texts: Sequence[str]) -> list[int]:
    """cl100k_base lengths of many texts in one batched call."""
    encoded = tokens.encoding().encode_batch(list(texts), disallowed_special=())
    return [len(ids) for ids in encoded]


def empty_vectors(dimensions: int) -> Vectors:
    return np.zeros((0, dimensions), dtype=np.float32)
