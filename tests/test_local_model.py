"""The real all-MiniLM-L6-v2 model, offline: it embeds a folder and a cosine query finds the right page."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pgvector import Vector

from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.embed import SentenceTransformerEmbedder
from tests.conftest import make_settings

pytestmark = pytest.mark.model

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "knowledge"


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)


def test_minilm_embeds_the_sample_and_cosine_finds_the_right_page(
    minilm: SentenceTransformerEmbedder, database_url: str, conn: Connection
) -> None:
    settings = make_settings(
        database_url,
        embedding_provider="sentence-transformers",
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
    )
    summary = run_ingest(settings, SAMPLES, embedder_factory=lambda model, s: minilm)
    assert summary["embeddings"]["embedded"] == summary["chunks"]["written"] > 10

    expectations = {
        "how do I undo a bad release?": "engineering/deploy.md",
        "who writes the timeline during an outage?": "operations/incident-response.md",
        "when does the pager escalate to the backup engineer?": "operations/on-call.md",
    }
    for question, expected in expectations.items():
        (vector,) = asyncio.run(minilm.embed([question]))
        row = conn.execute(
            "SELECT d.path FROM chunks c JOIN documents d ON d.id = c.document_id"
            " ORDER BY c.emb_all_minilm_l6_v2_384 <=> %s LIMIT 1",
            (Vector(vector),),
        ).fetchone()
        assert row == (expected,), question


def test_minilm_vectors_are_unit_length_and_truncation_is_counted(
    minilm: SentenceTransformerEmbedder,
) -> None:
    vectors = asyncio.run(minilm.embed(["short text", "another"]))
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert minilm.prepare("word " * 1000)[1] is True
    assert minilm.prepare("a few words")[1] is False
