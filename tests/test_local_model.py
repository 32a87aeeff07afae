"""The real all-MiniLM-L6-v2 model, offline: it embeds a folder and a cosine query finds the right page."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from pgvector import Vector

from config.settings import Settings
from flows.ingest import run_ingest
from tasks.chunk import chunk_document
from tasks.db import Connection
from tasks.discover import read_document, walk_source
from tasks.embed import SentenceTransformerEmbedder
from tasks.records import FoundFile
from tasks.registry import EmbeddingModel
from tests.conftest import CORPORA, make_settings

pytestmark = pytest.mark.model

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "knowledge"
RUST_BOOK = CORPORA / "rust-book"


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


def corpus_texts(count: int) -> list[str]:
    """Embed texts the chunker makes of real pages: many lengths, code, tables, long sections."""
    texts: list[str] = []
    for found in walk_source(RUST_BOOK):
        if isinstance(found, FoundFile):
            doc = read_document(found)
            texts += [c.embed_text for c in chunk_document(doc, chunker="headings", max_tokens=256)]
        if len(texts) >= count:
            break
    return texts[:count]


def test_one_tokenization_gives_the_vectors_of_encode_and_counts_the_cut_texts(
    minilm: SentenceTransformerEmbedder,
) -> None:
    texts = [*corpus_texts(40), "word " * 600, "tiny"]
    fp32 = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384, precision="fp32")
    vectors, truncated = fp32.encode_counting_truncated(texts)
    reference = fp32.model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    assert float(np.min(np.sum(vectors * reference, axis=1))) > 0.99999
    assert truncated == sum(count > fp32.max_input_tokens for count in fp32.count_tokens(texts)) >= 1


def test_bf16_stays_within_cosine_0_9999_of_fp32_on_real_texts() -> None:
    """bf16 shares the fp32 cache key because of this bound (see Settings.local_precision)."""
    texts = corpus_texts(64)
    fp32 = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384, precision="fp32").encode(texts)
    bf16_embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384, precision="bf16")
    bf16 = bf16_embedder.encode(texts)
    assert bf16_embedder.precision == "bf16"
    assert bf16_embedder.model_key == "sentence-transformers:all-MiniLM-L6-v2:384"
    assert float(np.min(np.sum(fp32 * bf16, axis=1))) >= 0.9999


def test_a_run_with_no_cache_misses_never_loads_the_model(database_url: str, tmp_path: Path) -> None:
    built: list[SentenceTransformerEmbedder] = []

    def factory(model: EmbeddingModel, settings: Settings) -> SentenceTransformerEmbedder:
        built.append(SentenceTransformerEmbedder(model.model, model.dimensions))
        return built[-1]

    root = tmp_path / "kb"
    shutil.copytree(SAMPLES, root)
    settings = make_settings(
        database_url,
        embedding_provider="sentence-transformers",
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
    )
    first = run_ingest(settings, root, embedder_factory=factory)
    assert first["embeddings"]["embedded"] > 0 and built[0].loads == 1

    unchanged = run_ingest(settings, root, embedder_factory=factory)
    refreshed = run_ingest(settings, root, full_refresh=True, embedder_factory=factory)
    assert len(built) == 3 and [e.loads for e in built[1:]] == [0, 0]
    assert unchanged["embeddings"]["cache_misses"] == refreshed["embeddings"]["cache_misses"] == 0
    assert refreshed["embeddings"]["cache_hits"] == first["chunks"]["written"]
