"""The `hash` provider: deterministic unit vectors with no model, for tests and dry runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from config.settings import Settings, model_key
from tasks.providers.base import CL100K, Vectors, count_cl100k, empty_vectors, truncate_tokens


class HashEmbedder:
    """Deterministic unit vectors from SHAKE-256 of the text. No model; for tests and dry runs."""

    max_input_tokens = 8191
    tokenizer = CL100K
    max_concurrency = 1
    precision = "fp32"

    def __init__(self, model: str, dimensions: int) -> None:
        self.model_key = model_key("hash", model, dimensions)
        self.dimensions = dimensions
        self.max_batch_inputs = 2048

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return empty_vectors(self.dimensions)
        return np.stack([hash_vector(text, self.dimensions) for text in texts])

    def prepare(self, text: str) -> tuple[str, bool]:
        return truncate_tokens(text, self.max_input_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """cl100k, as it truncates: the chunker's own count, so the cap changes nothing here."""
        return count_cl100k(texts)

    async def aclose(self) -> None:
        return None


def hash_vector(text: str, dimensions: int) -> Vectors:
    raw = np.frombuffer(hashlib.shake_256(text.encode()).digest(2 * dimensions), dtype=np.int16)
    vector = raw.astype(np.float32) + np.float32(0.5)  # +0.5: never the zero vector
    return vector / np.float32(np.linalg.norm(vector))


def create(model: str, dimensions: int, settings: Settings) -> HashEmbedder:
    return HashEmbedder(model, dimensions)
