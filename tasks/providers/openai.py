"""The `openai` provider: the official SDK, at any OpenAI-compatible `base_url`.

Vectors travel as base64 float32 and are decoded with numpy straight from the raw
response, without building a model object per embedding.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from config.settings import Settings, model_key
from tasks.providers.base import (
    CL100K,
    TerminalEmbeddingError,
    TransientEmbeddingError,
    Vectors,
    count_cl100k,
    empty_vectors,
    truncate_tokens,
)


class OpenAIEmbedder:
    """The official SDK; `base_url` points it at Azure, Ollama, vLLM or another compatible server."""

    max_input_tokens = 8191
    tokenizer = CL100K
    max_batch_inputs = 2048
    precision = "fp32"

    def __init__(self, model: str, dimensions: int, settings: Settings) -> None:
        self.model_key = model_key("openai", model, dimensions)
        if settings.openai_api_key is None:
            raise TerminalEmbeddingError(
                "OPENAI_API_KEY is not set; the openai provider needs it", model_key=self.model_key
            )
        self.model = model
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
        if not texts:
            return empty_vectors(self.dimensions)
        extra: dict[str, Any] = {"encoding_format": "base64"}
        if self.model.startswith("text-embedding-3"):
            extra["dimensions"] = self.dimensions
        try:
            raw = await self._client().embeddings.with_raw_response.create(
                model=self.model, input=list(texts), **extra
            )
        except Exception as exc:
            classified = self._classified(exc)
            if classified is exc:
                raise
            raise classified from None
        return decode_embeddings(raw.content, self.dimensions, self.model_key)

    def _classified(self, exc: Exception) -> Exception:
        """The SDK's error as ours: transient (retried) or terminal (with the API's own message)."""
        import openai

        if isinstance(exc, openai.RateLimitError | openai.InternalServerError):
            return TransientEmbeddingError(
                f"embedding API answered {exc.status_code}",
                model_key=self.model_key,
                retry_after=retry_after_seconds(exc.response.headers),
            )
        if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
            return TransientEmbeddingError(
                f"embedding API unreachable: {type(exc).__name__}", model_key=self.model_key
            )
        if isinstance(exc, openai.APIStatusError):
            # The API's own message is shown, with the key masked should a server echo it.
            message = _api_message(exc).replace(self._client_options["api_key"], "***")
            return TerminalEmbeddingError(
                f"embedding API refused the request with {exc.status_code}: {message}",
                model_key=self.model_key,
            )
        return exc

    def prepare(self, text: str) -> tuple[str, bool]:
        return truncate_tokens(text, self.max_input_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_cl100k(texts)

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None and not bound[0].is_closed():
            await bound[1].close()


def decode_embeddings(body: bytes, dimensions: int, key: str) -> Vectors:
    """The `data` of an embeddings response body as one float32 matrix, in input order.

    Base64 items are decoded with numpy; a server that ignores `encoding_format`
    and answers floats is read as well.
    """
    try:
        ordered = sorted(json.loads(body)["data"], key=lambda item: item["index"])
        rows = [_vector(item["embedding"]) for item in ordered]
    except (KeyError, TypeError, ValueError) as exc:
        raise TerminalEmbeddingError(
            f"the embeddings API answered a body this client cannot read ({type(exc).__name__}: {exc})",
            model_key=key,
        ) from None
    wrong = {len(row) for row in rows if len(row) != dimensions}
    if wrong:
        raise TerminalEmbeddingError(
            f"the API returned vectors of {sorted(wrong)} dimensions, but the column holds "
            f"{dimensions}; check the configured dimensions against the model",
            model_key=key,
        )
    if not rows:
        return empty_vectors(dimensions)
    return np.stack(rows).astype(np.float32, copy=False)


def _vector(embedding: Any) -> Vectors:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


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


def create(model: str, dimensions: int, settings: Settings) -> OpenAIEmbedder:
    return OpenAIEmbedder(model, dimensions, settings)
