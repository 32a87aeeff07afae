"""Embedders for tests that count what reaches them, so cache hits are proven by counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from config.settings import Settings
from tasks.embed import Embedder, HashEmbedder, Vectors, make_embedder
from tasks.registry import EmbeddingModel


class CountingEmbedder:
    """Wraps a real embedder and records every text and call it receives."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_key = inner.model_key
        self.dimensions = inner.dimensions
        self.max_batch_inputs = inner.max_batch_inputs
        self.max_input_tokens = inner.max_input_tokens
        self.tokenizer = inner.tokenizer
        self.max_concurrency = inner.max_concurrency
        self.texts: Counter[str] = Counter()
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        self.texts.update(texts)
        return await self.inner.embed(texts)

    def prepare(self, text: str) -> tuple[str, bool]:
        return self.inner.prepare(text)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def embedded(self) -> int:
        return sum(self.texts.values())


class CountingFactory:
    """An embedder factory for `run_ingest` that keeps one counting embedder per model."""

    def __init__(self) -> None:
        self.embedders: dict[str, CountingEmbedder] = {}

    def __call__(self, model: EmbeddingModel, settings: Settings) -> Embedder:
        if model.model_key not in self.embedders:
            inner = make_embedder(model.provider, model.model, model.dimensions, settings)
            self.embedders[model.model_key] = CountingEmbedder(inner)
        return self.embedders[model.model_key]

    @property
    def embedded(self) -> int:
        return sum(e.embedded for e in self.embedders.values())

    def reset(self) -> None:
        for embedder in self.embedders.values():
            embedder.texts.clear()
            embedder.calls = 0


def hash_embedder(dimensions: int = 64) -> HashEmbedder:
    return HashEmbedder("test", dimensions)
