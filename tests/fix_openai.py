"""The loopback embeddings API: a real HTTP server on 127.0.0.1 the real `openai` SDK talks to.

`server` is a 64-dimension fake for one test (a module that wants other dimensions
defines its own `server`); `loopback_settings` points the openai provider at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from config.settings import Settings
from tests.conftest import make_settings
from tests.fake_openai import FakeEmbeddingsServer

OPENAI_MODEL = {
    "embedding_provider": "openai",
    "embedding_model": "text-embedding-3-small",
    "embedding_dimensions": 64,
}


@pytest.fixture
def server() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(dimensions=64) as running:
        yield running


def loopback_settings(
    database_url: str, server: FakeEmbeddingsServer, api_key: str, **overrides: Any
) -> Settings:
    """Settings of this test's database with text-embedding-3-small at 64 dims on the fake API."""
    values: dict[str, Any] = {**OPENAI_MODEL, "openai_api_key": api_key, "openai_base_url": server.base_url}
    return make_settings(database_url, **(values | overrides))
