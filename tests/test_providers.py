"""The provider registry, token counting, precision choice and the openai wire format; no database."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from pydantic import SecretStr

from config.settings import ProviderName, Settings
from tasks import tokens
from tasks.embed import EmbedPolicy, HashEmbedder, OpenAIEmbedder, TerminalEmbeddingError, make_embedder
from tasks.providers import PROVIDER_MODULES, PROVIDER_NAMES
from tasks.providers.local import SentenceTransformerEmbedder, cpu_has_bf16, resolve_precision
from tasks.providers.openai import decode_embeddings
from tests.fake_openai import FakeEmbeddingsServer


@pytest.fixture
def server() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(dimensions=8) as running:
        yield running


def test_one_registry_names_the_providers_for_settings_and_factory() -> None:
    assert set(get_args(ProviderName)) == set(PROVIDER_NAMES) == set(PROVIDER_MODULES)
    with pytest.raises(ValueError, match="embedding_provider"):
        Settings(embedding_provider="nope")  # type: ignore[arg-type]
    with pytest.raises(TerminalEmbeddingError, match="unknown provider 'nope'.*openai"):
        make_embedder("nope", "m", 8, Settings())


def test_building_the_local_provider_loads_neither_model_nor_tokenizer() -> None:
    embedder = make_embedder("sentence-transformers", "all-MiniLM-L6-v2", 384, Settings())
    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert embedder.max_input_tokens == 256  # read from the model folder, not from the model
    assert embedder.loads == 0 and embedder.precision is None and not embedder._tokenizers


def test_local_counts_use_the_models_tokenizer_without_loading_it_or_warning(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)
    long_text = "tokenizer " * 600
    with caplog.at_level(logging.WARNING):
        counts = embedder.count_tokens(["hello world", long_text, ""])
    assert counts[0] == 4  # [CLS] hello world [SEP]
    assert counts[1] > 600 and counts[2] == 2
    assert embedder.prepare(long_text) == (long_text, True)
    assert embedder.prepare("a few words") == ("a few words", False)
    assert embedder.loads == 0
    assert "sequence length is longer" not in caplog.text + "".join(capfd.readouterr())


def test_openai_and_hash_count_in_cl100k_as_they_truncate() -> None:
    texts = ["hello world", "<|endoftext|> is plain text here", "ünïcödé " * 20]
    openai = OpenAIEmbedder("text-embedding-3-small", 8, Settings(openai_api_key=SecretStr("sk-x")))
    assert openai.count_tokens(texts) == [len(tokens.encode(t)) for t in texts]
    assert HashEmbedder("t", 8).count_tokens(texts) == [len(tokens.encode(t)) for t in texts]
    assert openai.tokenizer == HashEmbedder("t", 8).tokenizer == "cl100k_base"


def test_openai_truncation_skips_the_encode_for_short_texts_and_cuts_long_ones() -> None:
    openai = OpenAIEmbedder("text-embedding-3-small", 8, Settings(openai_api_key=SecretStr("sk-x")))
    assert openai.prepare("short") == ("short", False)
    cut, truncated = openai.prepare("word " * 9000)
    assert truncated and len(tokens.encode(cut)) == openai.max_input_tokens


@pytest.mark.parametrize(
    ("setting", "cuda", "cpu_bf16", "expected"),
    [
        ("auto", False, True, "bf16"),
        ("auto", True, False, "bf16"),
        ("auto", False, False, "fp32"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
    ],
)
def test_precision_choice(setting: str, cuda: bool, cpu_bf16: bool, expected: str) -> None:
    assert resolve_precision(setting, cuda=cuda, cpu_bf16=cpu_bf16) == expected  # type: ignore[arg-type]


def test_cpu_bf16_is_read_from_the_flags(tmp_path: Path) -> None:
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_bf16(with_bf16) and not cpu_has_bf16(without)
    assert not cpu_has_bf16(tmp_path / "missing")


def test_local_precision_setting_reaches_the_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGINGEST_LOCAL_PRECISION", "fp32")
    embedder = make_embedder("sentence-transformers", "all-MiniLM-L6-v2", 384, Settings())
    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert embedder.requested_precision == "fp32"


def test_local_calls_default_to_256_texts_unless_the_setting_is_given() -> None:
    local = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)
    assert EmbedPolicy.from_settings(Settings(), local).batch_inputs == 256
    assert EmbedPolicy.from_settings(Settings(embed_batch_inputs=32), local).batch_inputs == 32
    assert EmbedPolicy.from_settings(Settings(), HashEmbedder("t", 8)).batch_inputs == 128


def test_base64_bodies_decode_in_order_and_floats_are_read_too() -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    items = [
        {"index": i, "embedding": base64.b64encode(vectors[i].astype("<f4").tobytes()).decode()}
        for i in (2, 0, 1)
    ]
    decoded = decode_embeddings(json.dumps({"data": items}).encode(), 4, "k")
    assert decoded.dtype == np.float32 and np.array_equal(decoded, vectors)
    floats = [{"index": i, "embedding": vectors[i].tolist()} for i in range(3)]
    assert np.array_equal(decode_embeddings(json.dumps({"data": floats}).encode(), 4, "k"), vectors)
    with pytest.raises(TerminalEmbeddingError, match=r"\[4\] dimensions.*holds 5"):
        decode_embeddings(json.dumps({"data": items}).encode(), 5, "k")
    with pytest.raises(TerminalEmbeddingError, match="cannot read"):
        decode_embeddings(b'{"nothing": 1}', 4, "k")


def test_openai_asks_for_base64_and_aclose_closes_the_client(server: FakeEmbeddingsServer) -> None:
    settings = Settings(openai_api_key=SecretStr("sk-x"), openai_base_url=server.base_url)
    embedder = OpenAIEmbedder("text-embedding-3-small", 8, settings)

    async def embed_and_close() -> tuple[np.ndarray, bool]:
        vectors = await embedder.embed(["alpha", "beta"])
        client = embedder._client()
        await embedder.aclose()
        return vectors, bool(client.is_closed())

    vectors, closed = asyncio.run(embed_and_close())
    assert closed and embedder._bound is None
    assert [r.encoding_format for r in server.requests] == ["base64"]
    assert np.allclose(vectors[1], server.vector_for("beta", 8), atol=1e-7)
