"""The retrieval quality gate: the docs-qa fixture with the real MiniLM model against the committed baseline.

The fixture is the docs-qa corpus rebuilt as Markdown (`eval/docsqa.py`) and its
100 labelled questions (`eval/docsqa_cases.jsonl`). No metric of any mode may fall
more than 0.02 below `eval/docsqa_baseline.json`, and the gate must be able to
fail: a chunker that drops every section after a page's first one fails it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eval import docsqa
from flows.evaluate import run_evaluation
from flows.ingest import run_ingest
from tasks.embed import Embedder, SentenceTransformerEmbedder
from tasks.evaluate import METRICS, gate_failures
from tasks.records import Chunk, ParsedDocument
from tests.conftest import make_settings
from tests.test_search import scratch_database

pytestmark = pytest.mark.model

BASELINE = Path(__file__).resolve().parents[1] / "eval" / "docsqa_baseline.json"
Report = dict[str, Any]


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)


@pytest.fixture(scope="module")
def baseline() -> Report:
    loaded: Report = json.loads(BASELINE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docsqa")
    docsqa.write_tree(root, docsqa.group_pages(docsqa.load_sections()))
    return root


def ingest_and_evaluate(url: str, tree: Path, embedder: Embedder, k: int) -> Report:
    """The fixture as a user builds it: ingest the tree with MiniLM, then every case in every mode."""
    settings = make_settings(
        url,
        embedding_provider="sentence-transformers",
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
    )
    run_ingest(settings, tree, embedder_factory=lambda model, s: embedder)
    return run_evaluation(settings, docsqa.DEFAULT_CASES, k=k, embedder_factory=lambda model, s: embedder)


@pytest.fixture(scope="module")
def healthy(
    server_url: str, template_url: str, tree: Path, minilm: SentenceTransformerEmbedder, baseline: Report
) -> Iterator[Report]:
    with scratch_database(server_url, template_url) as url:
        yield ingest_and_evaluate(url, tree, minilm, baseline["k"])


def test_docsqa_holds_the_committed_baseline(healthy: Report, baseline: Report) -> None:
    assert [(r["mode"], r["model"]) for r in healthy["results"]] == [
        ("vector", "all_minilm_l6_v2_384"),
        ("lexical", None),
        ("hybrid", "all_minilm_l6_v2_384"),
    ]
    assert healthy["cases"] == baseline["cases"] == 100
    assert gate_failures(healthy["results"], baseline["results"]) == []


def test_hybrid_is_at_least_as_good_as_the_better_single_mode(healthy: Report) -> None:
    mrr = {row["mode"]: row["mrr"] for row in healthy["results"]}
    assert mrr["hybrid"] >= max(mrr["vector"], mrr["lexical"])


def first_section_only(chunker: Any) -> Any:
    """A broken chunker: every section after a page's first one is dropped."""

    def chunk(doc: ParsedDocument, **options: Any) -> list[Chunk]:
        chunks: list[Chunk] = chunker(doc, **options)
        return [c for c in chunks if chunks and c.heading_path == chunks[0].heading_path]

    return chunk


def test_the_gate_fails_when_the_chunker_drops_the_sections(
    server_url: str,
    template_url: str,
    tree: Path,
    minilm: SentenceTransformerEmbedder,
    baseline: Report,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.chunk import chunk_document

    # The ingest's prepare stage calls the chunker through its own module's name.
    monkeypatch.setattr("tasks.prepare.chunk_document", first_section_only(chunk_document))
    with scratch_database(server_url, template_url) as url:
        broken = ingest_and_evaluate(url, tree, minilm, baseline["k"])

    failures = gate_failures(broken["results"], baseline["results"])
    failed = {(line.split(":")[0], line.split()[1]) for line in failures}
    for row in baseline["results"]:
        mode = f"{row['mode']}/{row['model'] or '-'}"
        assert {(mode, "mrr"), (mode, "recall@k")} <= failed, failures
    assert all(name in METRICS for _, name in failed)
