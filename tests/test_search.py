"""Search against a real Postgres: vector through HNSW, BM25 lexical, RRF hybrid, filters, citations."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import psycopg
import pytest
from psycopg import sql

from cli.main import main
from config.settings import Settings
from flows.ingest import run_ingest
from tasks.db import Connection, connect
from tasks.embed import hash_vector
from tasks.ranking import PageHit, fuse_pages, group_pages, until_pages
from tasks.registry import InvalidIdentifier, get_model
from tasks.search import (
    MAX_QUERY_CHARS,
    QueryTerm,
    SearchError,
    SearchFilters,
    SearchHit,
    SearchOptions,
    containment_documents,
    fill_pages,
    fuse_rrf,
    lexical_search,
    looks_like_identifier,
    match_terms,
    options_from_settings,
    parse_where,
    resolve_model,
    search,
    search_pages,
    vector_query,
    vector_search,
)
from tasks.status import database_status, format_status
from tests.conftest import TEMPLATE_DB, make_settings
from tests.test_ingest import write_tree

PAGES = {
    "guides/install.md": "---\ntitle: Installing\ntags: [setup, linux]\nowner: platform\n---\n"
    "# Installing\n\n"
    "Run the installer.\n\n## On Linux\n\nUse the package manager to install the tool.\n\n"
    "## On macOS\n\nUse Homebrew to install it.\n",
    "guides/deploy.md": "---\nowner: ops\ndraft: true\n---\n# Deploying\n\n"
    "Ship the build to production with the deploy command.\n\n"
    "## Rollback\n\nRevert with the rollback command when a release goes wrong.\n",
    "reference/cli.md": "---\ntitle: CLI reference\nrag_namespace: ref\n---\n## ingest\n\n"
    "Syncs a folder. The --full-refresh flag re-chunks every file.\n\n## status\n\nShows coverage.\n",
    "reference/errors.md": "# Errors\n\n## E0382\n\n"
    "Use of a moved value: the compiler refuses it after a move.\n\n"
    "## Timeouts\n\nA request that takes too long fails; the rollback of a deploy is not affected.\n",
}
SLUG = "test_64"


@contextmanager
def scratch_database(server_url: str, template_url: str) -> Iterator[str]:
    """A database cloned from the migrated template for a whole module, dropped afterwards."""
    name = f"ragingest_module_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    try:
        yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_databases = itertools.count()


@pytest.fixture(scope="module")
def shared_kb(server_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The pages ingested once for the tests that only read; yields the database URL."""
    with scratch_database(server_url, template_url) as url:
        run_ingest(make_settings(url), write_tree(tmp_path_factory.mktemp("kb"), dict(PAGES)))
        yield url


@pytest.fixture
def reader(shared_kb: str) -> Iterator[Connection]:
    with connect(shared_kb) as connection:
        yield connection


@pytest.fixture
def kb(tmp_path: Path, settings: Settings) -> Path:
    """The pages ingested into this test's own database, for tests that change it."""
    root = write_tree(tmp_path / "kb", dict(PAGES))
    run_ingest(settings, root)
    return root


def stored_vector(conn: Connection, path: str, heading: str) -> tuple[int, np.ndarray[Any, Any]]:
    row = conn.execute(
        "SELECT c.id, c.emb_test_64 FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE d.path = %s AND c.heading_path[array_length(c.heading_path, 1)] = %s",
        (path, heading),
    ).fetchone()
    assert row is not None
    return int(row[0]), np.asarray(row[1].to_numpy())


def model(conn: Connection) -> Any:
    found = get_model(conn, SLUG)
    assert found is not None
    return found


# --- vector --------------------------------------------------------------------------------


def test_vector_search_finds_the_nearest_chunk_first_and_cites_it(reader: Connection) -> None:
    chunk_id, vector = stored_vector(reader, "guides/install.md", "On macOS")
    hits = vector_search(reader, model(reader), vector, limit=3)

    assert [h.chunk_id for h in hits][0] == chunk_id and len(hits) == 3
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    citation = hits[0].citation
    assert (citation.path, citation.title, citation.heading_path, citation.chunk_id) == (
        "guides/install.md",
        "Installing",
        ("Installing", "On macOS"),
        chunk_id,
    )
    assert citation.score == hits[0].score
    assert citation.label() == f"guides/install.md > Installing > On macOS [chunk {chunk_id}]"


def test_vector_query_is_served_by_the_hnsw_index(reader: Connection) -> None:
    from pgvector import Vector
    from psycopg import sql

    query, params = vector_query(model(reader), SearchFilters())
    params.update(vector=Vector(hash_vector("anything", 64)), limit=5)
    with reader.transaction():
        reader.execute("SET LOCAL enable_seqscan = off")  # the table is tiny; ask for the index path
        plan = "\n".join(row[0] for row in reader.execute(sql.SQL("EXPLAIN ") + query, params))
    assert "chunks_emb_test_64_hnsw" in plan


def test_ef_search_is_set_for_the_query_only(reader: Connection) -> None:
    _, vector = stored_vector(reader, "guides/deploy.md", "Rollback")
    before = reader.execute("SELECT current_setting('hnsw.ef_search', true)").fetchone()
    vector_search(reader, model(reader), vector, limit=2, ef_search=123)
    after = reader.execute("SELECT current_setting('hnsw.ef_search', true)").fetchone()
    assert before == after == ("40",)  # pgvector's default, untouched outside the query


def test_a_limit_past_pgvectors_ef_search_bound_still_searches(reader: Connection) -> None:
    _, vector = stored_vector(reader, "guides/deploy.md", "Rollback")
    everything = reader.execute("SELECT count(*) FROM chunks").fetchone()
    assert everything is not None
    assert len(vector_search(reader, model(reader), vector, limit=1500)) == everything[0]
    # Asking for more pages than there are fetches up to the bound, then returns them all.
    pages = search_pages(
        reader,
        "rollback",
        options=SearchOptions(mode="hybrid", k=10, group_by="page"),
        model=model(reader),
        vector=vector,
    )
    assert len(pages) == len(PAGES)


def test_min_score_drops_weak_vector_hits(reader: Connection) -> None:
    chunk_id, vector = stored_vector(reader, "guides/deploy.md", "Rollback")
    found = model(reader)
    everything = search(reader, "x", options=SearchOptions(mode="vector", k=5), model=found, vector=vector)
    strict = search(
        reader, "x", options=SearchOptions(mode="vector", k=5, min_score=0.99), model=found, vector=vector
    )
    assert len(everything) == 5
    assert [h.chunk_id for h in strict] == [chunk_id]


# --- lexical -------------------------------------------------------------------------------


def test_lexical_search_ranks_by_bm25_and_weights_headings(reader: Connection) -> None:
    hits = lexical_search(reader, "how do I roll back with rollback?", limit=5)

    # "Rollback" is the heading of one chunk and a body word of two others.
    assert hits[0].path == "guides/deploy.md" and hits[0].heading_path == ("Deploying", "Rollback")
    assert {h.path for h in hits} >= {"guides/deploy.md", "reference/errors.md"}
    assert all(h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert [dict(h.ranks)["lexical"] for h in hits] == list(range(1, len(hits) + 1))


def test_lexical_search_takes_any_text_safely(reader: Connection) -> None:
    assert lexical_search(reader, "the and of", limit=5) == []  # only stop words
    assert lexical_search(reader, "", limit=5) == []
    odd = lexical_search(reader, "homebrew' & | ! :* \\ ( <-> 'install", limit=5)
    assert odd and odd[0].heading_path == ("Installing", "On macOS")
    # Plain words to search for: "chunks" is in the page about re-chunking, "drop" and "table" nowhere.
    injected = lexical_search(reader, "'; DROP TABLE chunks; --", limit=5)
    assert [h.path for h in injected] == ["reference/cli.md"]
    assert reader.execute("SELECT count(*) FROM chunks").fetchone() != (0,)


def test_match_terms_widen_from_the_rarest_within_the_budget() -> None:
    terms = [QueryTerm("common", 900), QueryTerm("rare", 3), QueryTerm("mid", 100), QueryTerm("absent", 0)]
    assert [t.lexeme for t in match_terms(terms, budget=1003)] == ["rare", "mid", "common"]
    assert [t.lexeme for t in match_terms(terms, budget=1002)] == ["rare", "mid"]
    assert [t.lexeme for t in match_terms(terms, budget=1)] == ["rare"]  # the rarest always
    assert match_terms([QueryTerm("absent", 0)]) == []
    assert QueryTerm("rare", 3).idf(1000) > QueryTerm("common", 900).idf(1000) > 0


# --- hybrid ----------------------------------------------------------------------------------


def hit(chunk_id: int, score: float = 0.0) -> SearchHit:
    return SearchHit(chunk_id, "s", f"p{chunk_id}.md", "default", "t", (), "", score)


def test_rrf_scores_by_hand_and_breaks_ties_by_best_rank_then_chunk_id() -> None:
    vector = [hit(1), hit(2), hit(3)]
    lexical = [hit(3), hit(4), hit(1)]
    fused = fuse_rrf({"vector": vector, "lexical": lexical}, k=60)

    scores = {h.chunk_id: h.score for h in fused}
    assert scores[1] == pytest.approx(1 / 61 + 1 / 63)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62) and scores[4] == pytest.approx(1 / 62)
    # 1 and 3 tie on score and on best rank (1): the lower id wins. 2 and 4 tie too.
    assert [h.chunk_id for h in fused] == [1, 3, 2, 4]
    assert dict(fused[0].ranks) == {"vector": 1, "lexical": 3}


def test_rrf_is_deterministic_whatever_the_input_order() -> None:
    vector = [hit(i) for i in (5, 9, 2, 7)]
    lexical = [hit(i) for i in (2, 8, 5, 1)]
    first = fuse_rrf({"vector": vector, "lexical": lexical}, k=60, limit=3)
    again = fuse_rrf({"lexical": list(lexical), "vector": list(vector)}, k=60, limit=3)
    assert first == again and len(first) == 3
    # 2 and 5 both score 1/61 + 1/63 with a best rank of 1; 9 and 8 both 1/62 with a best rank of 2.
    assert [h.chunk_id for h in first] == [2, 5, 8]


def test_rrf_weights_favour_a_list() -> None:
    vector, lexical = [hit(1), hit(2)], [hit(2), hit(1)]
    assert fuse_rrf({"vector": vector, "lexical": lexical})[0].chunk_id == 1  # tie: lower id
    weighted = fuse_rrf({"vector": vector, "lexical": lexical}, weights={"lexical": 2.0})
    assert weighted[0].chunk_id == 2
    assert fuse_rrf({"vector": [], "lexical": []}) == []


@pytest.mark.parametrize(
    "query",
    [
        "what does `ingest` do",
        "max_tokens limit",
        "tasks.embed module",
        "the --full-refresh flag",
        "error E0382",
        "claude-3-opus pricing",
        "getEmbedding returns",
        "call run()",
    ],
)
def test_identifier_queries_are_recognised(query: str) -> None:
    assert looks_like_identifier(query)


@pytest.mark.parametrize(
    "query",
    ["how do I deploy to production?", "What is Claude?", "roll back a bad release", "state-of-the-art"],
)
def test_plain_questions_are_not_identifiers(query: str) -> None:
    assert not looks_like_identifier(query)


def test_hybrid_fuses_both_lists_and_holds_lexical_hits_to_min_score(reader: Connection) -> None:
    chunk_id, vector = stored_vector(reader, "guides/install.md", "On macOS")
    options = SearchOptions(mode="hybrid", k=5)
    hits = search(reader, "rollback", options=options, model=model(reader), vector=vector)

    semantic = vector_search(reader, model(reader), vector, limit=options.depth)
    lexical = lexical_search(reader, "rollback", limit=options.depth)
    assert hits == fuse_rrf({"vector": semantic, "lexical": lexical}, limit=5)
    assert {mode for h in hits for mode, _ in h.ranks} == {"vector", "lexical"}
    assert any(len(h.ranks) == 2 for h in hits)
    assert all(h.similarity is not None for h in hits if "vector" in dict(h.ranks))
    strict = search(
        reader,
        "rollback",
        options=SearchOptions(mode="hybrid", k=5, min_score=0.99),
        model=model(reader),
        vector=vector,
    )
    # Only the chunk whose vector is the query's reaches a similarity of 0.99.
    assert [h.chunk_id for h in strict] == [chunk_id]


def test_vector_and_hybrid_need_a_model_and_a_vector(reader: Connection) -> None:
    with pytest.raises(SearchError, match="needs an embedding model"):
        search(reader, "rollback", options=SearchOptions(mode="hybrid"))


def test_a_query_no_search_can_take_is_refused_before_the_database(reader: Connection) -> None:
    lexical = SearchOptions(mode="lexical")
    with pytest.raises(SearchError, match="NUL byte"):
        search(reader, "roll\x00back", options=lexical)
    with pytest.raises(SearchError, match="characters long"):
        search_pages(reader, "x" * (MAX_QUERY_CHARS + 1), options=lexical)
    assert search(reader, "x" * MAX_QUERY_CHARS, options=lexical) == []


# --- pages -------------------------------------------------------------------------------------


def on(page: str, chunk_id: int) -> SearchHit:
    return SearchHit(chunk_id, "s", page, "default", "t", (), "", 1.0 / chunk_id)


def test_pages_come_once_at_the_rank_of_their_best_chunk() -> None:
    chunks = [on("a.md", 1), on("b.md", 2), on("a.md", 3), on("c.md", 4), on("b.md", 5)]
    pages = group_pages(chunks, "vector")
    assert [p.path for p in pages] == ["a.md", "b.md", "c.md"]
    assert [[c.chunk_id for c in p.chunks] for p in pages] == [[1, 3], [2, 5], [4]]
    assert [p.best.ranks for p in pages] == [(("vector", 1),), (("vector", 2),), (("vector", 3),)]
    assert pages[1].score == chunks[1].score  # a page scores as its best chunk
    # Down to the best chunk of the second page: chunk 3 (of a.md) ranks below b.md's best.
    assert [c.chunk_id for c in until_pages(chunks, 2)] == [1, 2]
    assert until_pages(chunks, 9) == chunks


def test_hybrid_pages_fuse_page_ranks_not_chunk_ranks() -> None:
    # a.md holds the top three vector chunks; b.md is first in lexical and fourth in vector.
    vector = [on("a.md", 1), on("a.md", 2), on("a.md", 3), on("b.md", 4)]
    lexical = [on("b.md", 4), on("a.md", 2)]
    pages = fuse_pages({"vector": vector, "lexical": lexical}, k=60)

    # As pages, a.md is 1st in vector and 2nd in lexical; b.md 2nd in vector and 1st in lexical.
    assert [p.path for p in pages] == ["a.md", "b.md"]  # tied scores: the better best rank, then the key
    assert pages[0].score == pytest.approx(1 / 61 + 1 / 62) == pages[1].score
    assert dict(pages[1].best.ranks) == {"vector": 2, "lexical": 1}
    # Citations in the order of the chunks' own fusion; the first is the page's best chunk.
    assert [c.chunk_id for c in pages[0].chunks] == [2, 1, 3]
    assert pages[0].best.chunk_id == 2
    chunks = fuse_rrf({"vector": vector, "lexical": lexical}, k=60)
    assert [c.chunk_id for c in chunks] == [2, 4, 1, 3]  # chunk fusion would not rank pages the same way
    weighted = fuse_pages({"vector": vector, "lexical": lexical}, weights={"lexical": 2.0}, limit=1)
    assert [p.path for p in weighted] == ["b.md"]


def test_fill_pages_fetches_more_until_it_holds_enough_pages() -> None:
    chunks = [on(f"p{n // 4}.md", n + 1) for n in range(40)]  # four chunks a page, ten pages
    asked: list[int] = []

    def fetch(limit: int) -> list[SearchHit]:
        asked.append(limit)
        return chunks[:limit]

    got = fill_pages(fetch, pages=5, start=4)
    assert asked == [5, 10, 20] and len({c.path for c in got}) == 5 and got == chunks[:17]
    asked.clear()
    assert fill_pages(fetch, pages=50, start=8) == chunks and asked == [50]  # ran out: all there is


@pytest.mark.parametrize("mode", ["vector", "lexical", "hybrid"])
def test_page_search_returns_each_page_once_with_its_chunks_cited(reader: Connection, mode: str) -> None:
    _, vector = stored_vector(reader, "guides/deploy.md", "Rollback")
    args: dict[str, Any] = {"model": model(reader), "vector": vector} if mode != "lexical" else {}
    options = SearchOptions(mode=cast(Any, mode), k=3, group_by="page")
    pages = search_pages(reader, "rollback install", options=options, **args)

    assert 1 <= len(pages) <= 3 and len({p.path for p in pages}) == len(pages)
    assert all(isinstance(p, PageHit) and p.chunks[0].chunk_id == p.best.chunk_id for p in pages)
    assert all(c.path == p.path for p in pages for c in p.chunks)
    if mode != "hybrid":  # a single mode: the order of first appearance among its chunks
        chunks = search(reader, "rollback install", options=SearchOptions(mode=cast(Any, mode), k=50), **args)
        assert [p.path for p in pages] == list(dict.fromkeys(c.path for c in chunks))[:3]
        assert [p.best.chunk_id for p in pages] == [
            next(c.chunk_id for c in chunks if c.path == p.path) for p in pages
        ]


def test_page_search_cli_adds_citations_and_keeps_the_hit_keys(
    env: None, kb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", "install rollback", "-k", "2", "--group-by", "page", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["group_by"] == "page" and len(result["results"]) == 2
    for row in result["results"]:
        assert set(row) >= {
            "rank",
            "chunk_id",
            "path",
            "title",
            "heading_path",
            "score",
            "citation",
            "content",
        }
        assert row["group_by"] == "page" and row["citations"][0]["chunk_id"] == row["chunk_id"]
        assert {c["path"] for c in row["citations"]} == {row["path"]}
    assert len({row["path"] for row in result["results"]}) == 2
    assert main(["search", "install rollback", "--group-by", "page", "--mode", "lexical"]) == 0
    assert "also guides/" in capsys.readouterr().out  # more than one chunk of a page, cited under it


# --- filters -----------------------------------------------------------------------------------


def paths(hits: list[SearchHit]) -> set[str]:
    return {h.path for h in hits}


@pytest.mark.parametrize("mode", ["vector", "lexical", "hybrid"])
def test_namespace_filter_holds_in_every_mode(reader: Connection, mode: str) -> None:
    _, vector = stored_vector(reader, "guides/deploy.md", "Rollback")
    options = SearchOptions(mode=mode, k=10)  # type: ignore[arg-type]
    everywhere = search(reader, "rollback install", options=options, model=model(reader), vector=vector)
    guides = search(
        reader,
        "rollback install",
        options=options,
        filters=SearchFilters(namespace="guides"),
        model=model(reader),
        vector=vector,
    )
    assert paths(everywhere) - paths(guides)
    assert guides and paths(guides) <= {"guides/install.md", "guides/deploy.md"}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ([("tags", "linux")], {"guides/install.md"}),  # list membership in the chunk's metadata
        ([("owner", "ops")], {"guides/deploy.md"}),  # a frontmatter key
        ([("draft", "true")], {"guides/deploy.md"}),  # a JSON boolean in the frontmatter
        ([("rag_namespace", "ref")], {"reference/cli.md"}),
        ([("owner", "platform"), ("tags", "setup")], {"guides/install.md"}),  # all must hold
        ([("owner", "platform"), ("tags", "nope")], set()),
        ([("owner", "x' OR '1'='1")], set()),
    ],
)
@pytest.mark.parametrize("mode", ["vector", "lexical"])
def test_where_filters_on_metadata_and_frontmatter(
    reader: Connection, mode: str, where: list[tuple[str, str]], expected: set[str]
) -> None:
    _, vector = stored_vector(reader, "reference/errors.md", "Timeouts")
    hits = search(
        reader,
        "install deploy rollback ingest coverage folder",
        options=SearchOptions(mode=mode, k=20),  # type: ignore[arg-type]
        filters=SearchFilters(where=tuple(where)),
        model=model(reader),
        vector=vector,
    )
    assert paths(hits) == expected


def test_options_read_the_search_settings_and_explicit_values_win() -> None:
    settings = cast(Settings, SimpleNamespace(search_min_score=0.42, search_ef_search=80, search_rrf_k=20))
    options = options_from_settings(settings, k=5, rrf_k=None)
    assert (options.min_score, options.ef_search, options.rrf_k, options.k) == (0.42, 80, 20, 5)
    assert options_from_settings(settings, min_score=0.1, ef_search=200).min_score == 0.1
    plain = options_from_settings(cast(Settings, SimpleNamespace()))
    assert (plain.min_score, plain.ef_search, plain.rrf_k, plain.mode) == (None, 40, 60, "hybrid")
    with pytest.raises(SearchError, match="k must be at least 1"):
        SearchOptions(k=0)
    with pytest.raises(SearchError, match="unknown mode"):
        SearchOptions(mode="fuzzy")  # type: ignore[arg-type]


def test_where_parsing_and_containment_documents() -> None:
    assert parse_where(["a=b", "c=", "d=e=f"]) == (("a", "b"), ("c", ""), ("d", "e=f"))
    with pytest.raises(SearchError, match="key=value"):
        parse_where(["novalue"])
    with pytest.raises(SearchError, match="key=value"):
        parse_where(["=x"])
    assert containment_documents("n", "3") == [{"n": "3"}, {"n": 3}, {"n": ["3"]}, {"n": [3]}]
    assert containment_documents("t", "x") == [{"t": "x"}, {"t": ["x"]}]


# --- models ------------------------------------------------------------------------------------


def test_the_active_model_is_the_default_and_slugs_are_validated(
    kb: Path, conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_model(conn).slug == SLUG
    assert resolve_model(conn, SLUG).slug == SLUG
    with pytest.raises(SearchError, match="not registered"):
        resolve_model(conn, "missing_model")
    with pytest.raises(InvalidIdentifier):
        resolve_model(conn, "emb; DROP TABLE chunks")
    conn.execute("UPDATE embedding_models SET status = 'backfilling'")
    assert resolve_model(conn, SLUG).slug == SLUG
    assert f"model {SLUG} is still backfilling" in caplog.text
    conn.execute("UPDATE embedding_models SET status = 'retired'")
    with pytest.raises(SearchError, match="no active embedding model"):
        resolve_model(conn)
    with pytest.raises(SearchError, match="retired"):
        resolve_model(conn, SLUG)


# --- readiness ---------------------------------------------------------------------------------


def test_status_reports_neural_and_lexical_readiness_apart(kb: Path, conn: Connection) -> None:
    ready = database_status(conn)["search"]
    assert ready == {
        "neural": {"ready": True, "model": SLUG, "problems": []},
        "lexical": {"ready": True, "problems": []},
    }

    conn.execute("UPDATE chunks SET emb_test_64 = NULL WHERE id = (SELECT min(id) FROM chunks)")
    status = database_status(conn)
    assert status["search"]["neural"]["ready"] is False
    missing = f"1 of {status['chunks']} chunks have no vector in emb_test_64"
    assert status["search"]["neural"]["problems"] == [missing]
    assert status["search"]["lexical"]["ready"] is True
    assert "neural     NOT READY: 1 of" in format_status(status)

    conn.execute("UPDATE chunks SET emb_test_64 = emb_test_64")  # nothing changes
    conn.execute("DROP INDEX chunks_emb_test_64_hnsw")
    conn.execute("DROP INDEX chunks_tsv_gin")
    status = database_status(conn)
    assert "index chunks_emb_test_64_hnsw is missing" in status["search"]["neural"]["problems"]
    assert status["search"]["lexical"] == {"ready": False, "problems": ["index chunks_tsv_gin is missing"]}


def test_an_empty_database_is_not_ready(conn: Connection) -> None:
    search_status = database_status(conn)["search"]
    assert search_status["neural"]["ready"] is False and search_status["lexical"]["ready"] is False
    assert "no active (primary) embedding model" in search_status["neural"]["problems"]


# --- the command line -----------------------------------------------------------------------------


def test_search_cli_prints_one_json_object_with_citations(
    env: None, kb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", "Homebrew install", "-k", "2", "--mode", "hybrid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["mode"], result["model"], result["k"]) == ("hybrid", SLUG, 2)
    assert len(result["results"]) == 2
    first = result["results"][0]
    assert set(first) >= {"rank", "chunk_id", "path", "title", "heading_path", "score", "citation", "content"}
    assert first["citation"] == {
        "path": "guides/install.md",
        "title": "Installing",
        "heading_path": ["Installing", "On macOS"],
        "chunk_id": first["chunk_id"],
        "score": first["score"],
        "label": f"guides/install.md > Installing > On macOS [chunk {first['chunk_id']}]",
    }


def test_search_cli_filters_and_reads_lexical_without_a_model(
    env: None, kb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", "rollback", "--mode", "lexical", "--namespace", "reference", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] is None and {r["path"] for r in result["results"]} == {"reference/errors.md"}

    assert main(["search", "rollback", "--where", "owner=ops", "--mode", "lexical"]) == 0
    out = capsys.readouterr().out
    assert "guides/deploy.md > Deploying > Rollback" in out and "errors.md" not in out


def test_search_cli_refuses_bad_input_with_one_readable_line(
    env: None, kb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", "x", "--where", "nokey"]) == 1
    assert capsys.readouterr().err.strip() == "ragingest: error: --where needs key=value, got 'nokey'"
    assert main(["search", "x", "--model", "Bad-Slug"]) == 1
    assert "invalid model slug 'Bad-Slug'" in capsys.readouterr().err
