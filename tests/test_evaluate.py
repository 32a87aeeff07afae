"""Evaluation: metrics by hand, case files, thresholds, the baseline gate, the CLI, the flow, docs-qa."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from config.settings import Settings
from eval import docsqa
from flows.evaluate import QualityGateFailed, gate, run_evaluation
from flows.ingest import run_ingest
from tasks.chunk import chunk_document
from tasks.db import Connection
from tasks.discover import parse_document
from tasks.embed import hash_vector
from tasks.evaluate import (
    METRICS,
    CaseFileError,
    EvalCase,
    Target,
    case_metrics,
    gate_failures,
    load_cases,
    ndcg_at,
    parse_threshold,
    passed_at,
    recall_at,
    reciprocal_rank,
    relevance,
    score_case,
    summarize,
    threshold_failures,
)
from tasks.registry import register_model
from tasks.search import SearchHit
from tests.conftest import corpus_root
from tests.test_ingest import write_tree
from tests.test_search import PAGES

RUSTBOOK_CASES = Path(__file__).resolve().parents[1] / "eval" / "rustbook_cases.jsonl"

# --- metrics by hand -----------------------------------------------------------------------


def test_metrics_of_a_ranking_by_hand() -> None:
    marks = [0, 1, 0, 1]  # two targets, found at ranks 2 and 4
    assert passed_at(marks, 1) == 0.0 and passed_at(marks, 3) == 1.0
    assert recall_at(marks, 2, 3) == 0.5 and recall_at(marks, 2, 4) == 1.0
    assert reciprocal_rank(marks, 10) == 0.5 and reciprocal_rank(marks, 1) == 0.0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at(marks, 2) == pytest.approx(dcg / ideal)
    assert ndcg_at(marks, 2) == pytest.approx(0.650921, abs=1e-6)


def test_a_perfect_ranking_scores_one_and_an_empty_one_zero() -> None:
    assert case_metrics([1, 1, 0], 2, 3) == {
        "pass@1": 1.0,
        "pass@3": 1.0,
        "pass@k": 1.0,
        "recall@k": 1.0,
        "mrr": 1.0,
        "ndcg@10": 1.0,
    }
    assert case_metrics([], 2, 10) == dict.fromkeys(METRICS, 0.0)
    assert case_metrics([0, 0, 0], 1, 3) == dict.fromkeys(METRICS, 0.0)


def test_ndcg_ideal_counts_at_most_ten_targets() -> None:
    assert ndcg_at([1] * 10, 12) == pytest.approx(1.0)
    assert ndcg_at([1] * 5 + [0] * 5, 5) == pytest.approx(1.0)
    assert ndcg_at([0] * 5 + [1] * 5, 5) < 1.0


def test_pass_at_k_and_recall_read_only_the_top_k() -> None:
    metrics = case_metrics([0, 0, 0, 1], 1, 3)  # found at rank 4, outside k=3
    assert metrics["pass@k"] == metrics["recall@k"] == metrics["mrr"] == 0.0
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(5))  # nDCG always reads the top 10


def test_a_second_chunk_of_the_same_target_is_not_counted_again() -> None:
    targets = [Target("a.md", "Setup"), Target("b.md")]
    ranked = [("a.md", ("Guide", "Setup")), ("a.md", ("Guide", "Setup")), ("c.md", ()), ("b.md", ("X",))]
    assert relevance(ranked, targets) == [1, 0, 0, 1]
    # The heading matches at any level of the path, ignoring case and spacing; the path must match.
    ranked = [("a.md", ("  setup ",)), ("a.md", ("Other",)), ("x/a.md", ("Setup",))]
    assert relevance(ranked, targets) == [1, 0, 0]
    assert relevance([], targets) == []


def hit(chunk_id: int, path: str, headings: tuple[str, ...], score: float) -> SearchHit:
    return SearchHit(chunk_id, "s", path, "default", "t", headings, "", score)


def test_tied_scores_are_read_in_the_order_search_returned() -> None:
    case = EvalCase("c1", "q", (Target("right.md"),))
    # Equal scores: search broke the tie by chunk id (3 before 7); the metrics take that order.
    ordered = [hit(3, "wrong.md", (), 0.5), hit(7, "right.md", (), 0.5)]
    result = score_case(case, ordered, k=10)
    assert result.metrics["mrr"] == 0.5 and result.metrics["pass@1"] == 0.0
    assert result.ranked == (("wrong.md", (), 3), ("right.md", (), 7))
    swapped = score_case(case, list(reversed(ordered)), k=10)
    assert swapped.metrics["mrr"] == 1.0


def test_page_targets_are_ranked_by_page_each_page_once_at_its_best_rank() -> None:
    case = EvalCase("pages", "q", (Target("a.md"), Target("b.md")))
    ranking = [hit(1, "a.md", ("X",), 3), hit(2, "a.md", ("Y",), 2), hit(3, "b.md", (), 1)]
    result = score_case(case, ranking, k=2)
    # As pages, a.md and b.md are first and second: both found within k=2.
    assert result.level == "page" and result.metrics == result.page
    assert result.page["recall@k"] == 1.0 and result.page["ndcg@10"] == 1.0
    # As chunks, a.md's second chunk takes rank 2 and pushes b.md out of the top 2.
    assert result.chunk["recall@k"] == 0.5 and result.chunk["ndcg@10"] < 1.0


def test_section_targets_are_scored_by_chunk_and_their_pages_by_page() -> None:
    case = EvalCase("sections", "q", (Target("a.md", "Y"), Target("a.md", "Z")))
    assert case.level == "chunk" and case.pages == (Target("a.md"),)
    result = score_case(case, [hit(1, "b.md", (), 3), hit(2, "a.md", ("Y",), 2)], k=10)
    assert result.metrics == result.chunk and result.chunk["mrr"] == 0.5
    assert result.chunk["recall@k"] == 0.5
    assert result.page["mrr"] == 0.5 and result.page["recall@k"] == 1.0  # one page, found


def test_page_results_are_scored_through_their_citations() -> None:
    from tasks.ranking import group_pages

    pages = group_pages([hit(1, "a.md", ("X",), 3), hit(2, "b.md", ("Y",), 2), hit(3, "a.md", ("Y",), 1)])
    result = score_case(EvalCase("c", "q", (Target("a.md", "Y"),)), pages, k=10)
    assert [chunk_id for _, _, chunk_id in result.ranked] == [1, 3, 2]  # a.md's chunks, then b.md's
    assert result.chunk["mrr"] == 0.5 and result.page["mrr"] == 1.0


def test_summaries_average_the_cases_and_name_the_failing_ones() -> None:
    cases = [EvalCase(f"c{i}", "q", (Target("a.md"),)) for i in range(4)]
    a1, b1, a2 = hit(1, "a.md", (), 1), hit(1, "b.md", (), 1), hit(2, "a.md", (), 1)
    rankings = [[a1], [b1, a2], [], [b1]]
    results = [score_case(c, r, 10) for c, r in zip(cases, rankings, strict=True)]
    summary = summarize("lexical", None, 10, results)
    assert summary.metrics["mrr"] == pytest.approx((1 + 0.5) / 4)
    assert summary.metrics["pass@1"] == 0.25 and summary.metrics["pass@k"] == 0.5
    assert summary.failing == ("c2", "c3")
    row = summary.to_dict()
    assert {"mode", "model", "k", "cases", "failing", *METRICS} <= set(row)
    assert row["levels"] == {"page": 4, "chunk": 0} and row["errors"] == []
    assert row["page"]["mrr"] == row["mrr"] and row["page"]["failing"] == ["c2", "c3"]
    assert set(row["chunk"]) == {*METRICS, "failing"}
    assert summarize("vector", "m", 10, []).metrics == dict.fromkeys(METRICS, 0.0)


# --- case files --------------------------------------------------------------------------------


def write_cases(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_cases_load_with_headings_paired_by_position(tmp_path: Path) -> None:
    path = write_cases(
        tmp_path / "cases.jsonl",
        [
            "# a comment",
            "",
            {"id": "a", "query": "q1", "expected_paths": ["x.md", "/y.md"]},
            {
                "id": "b",
                "query": "q2",
                "expected_paths": ["x.md", "x.md"],
                "expected_headings": ["One", "Two"],
                "namespace": "docs",
            },
        ],
    )
    first, second = load_cases(path)
    assert first == EvalCase("a", "q1", (Target("x.md"), Target("y.md")), None)
    assert second.targets == (Target("x.md", "One"), Target("x.md", "Two")) and second.namespace == "docs"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "cases.jsonl:1: invalid JSON"),
        ({"query": "q", "expected_paths": ["a"]}, "`id` must be a non-empty string"),
        ({"id": "a", "query": "q", "expected_paths": []}, "at least one path"),
        ({"id": "a", "query": "q", "expected_paths": "a.md"}, "must be a list"),
        (
            {"id": "a", "query": "q", "expected_paths": ["a"], "expected_headings": ["h", "i"]},
            "2 headings for 1 paths",
        ),
        ({"id": "a", "query": "q", "expected_paths": ["a"], "namespace": 3}, "`namespace` must be a string"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_cases_are_refused_with_file_and_line(tmp_path: Path, line: Any, message: str) -> None:
    with pytest.raises(CaseFileError, match=message):
        load_cases(write_cases(tmp_path / "cases.jsonl", [line]))


def test_duplicate_ids_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    case = {"id": "a", "query": "q", "expected_paths": ["a.md"]}
    with pytest.raises(CaseFileError, match="'a' appears twice"):
        load_cases(write_cases(tmp_path / "dup.jsonl", [case, case]))
    with pytest.raises(CaseFileError, match="holds no cases"):
        load_cases(write_cases(tmp_path / "empty.jsonl", ["# nothing"]))
    with pytest.raises(CaseFileError, match="cannot read"):
        load_cases(tmp_path / "missing.jsonl")


# --- thresholds and the baseline gate ------------------------------------------------------------


def row(mode: str, model: str | None, **metrics: float) -> dict[str, Any]:
    return {"mode": mode, "model": model, "failing": [], **dict.fromkeys(METRICS, 0.8), **metrics}


def test_thresholds_name_every_metric_under_them() -> None:
    assert parse_threshold("mrr=0.5") == ("mrr", 0.5)
    with pytest.raises(ValueError, match="metric one of"):
        parse_threshold("precision=0.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_threshold("mrr=high")
    rows = [row("vector", "m", mrr=0.4), row("lexical", None, mrr=0.9)]
    assert threshold_failures(rows, {"mrr": 0.5}) == ["vector/m: mrr 0.4000 is under 0.5"]
    assert threshold_failures(rows, {"mrr": 0.4, "pass@1": 0.8}) == []


def test_the_gate_allows_two_hundredths_below_the_baseline_and_no_more() -> None:
    baseline = [row("vector", "m", mrr=0.70), row("lexical", None, mrr=0.80)]
    assert gate_failures([row("vector", "m", mrr=0.685), row("lexical", None, mrr=0.81)], baseline) == []
    failures = gate_failures([row("vector", "m", mrr=0.67), row("lexical", None, mrr=0.80)], baseline)
    assert failures == ["vector/m: mrr 0.6700 is more than 0.02 below the baseline 0.7000"]
    missing = gate_failures([row("vector", "m", mrr=0.70)], baseline)
    assert missing == ["lexical/-: no result to compare with the baseline"]


# --- end to end with the hash provider ------------------------------------------------------------

CASES = [
    {
        "id": "macos",
        "query": "Homebrew",
        "expected_paths": ["guides/install.md"],
        "expected_headings": ["On macOS"],
    },
    {"id": "rollback", "query": "rollback release", "expected_paths": ["guides/deploy.md"]},
    {"id": "ref", "query": "coverage", "expected_paths": ["reference/cli.md"], "namespace": "ref"},
    {"id": "nowhere", "query": "kubernetes helm", "expected_paths": ["guides/install.md"]},
]


@pytest.fixture
def kb(tmp_path: Path, settings: Settings) -> Path:
    root = write_tree(tmp_path / "kb", dict(PAGES))
    run_ingest(settings, root)
    return root


@pytest.fixture
def cases_file(tmp_path: Path) -> Path:
    return write_cases(tmp_path / "cases.jsonl", CASES)


def test_run_evaluation_reports_each_mode_with_its_failing_cases(
    kb: Path, cases_file: Path, settings: Settings
) -> None:
    report = run_evaluation(settings, cases_file, k=3)
    assert (report["cases"], report["k"]) == (4, 3)
    results = {(r["mode"], r["model"]): r for r in report["results"]}
    assert list(results) == [("vector", "test_64"), ("lexical", None), ("hybrid", "test_64")]
    lexical = results[("lexical", None)]
    assert {"mode", "model", "k", "cases", "failing", *METRICS} <= set(lexical)
    assert {"group_by", "levels", "page", "chunk", "errors"} <= set(lexical)
    # Lexical finds the three answerable cases first; nothing matches "kubernetes helm".
    assert (lexical["pass@1"], lexical["mrr"], lexical["failing"]) == (0.75, 0.75, ["nowhere"])
    assert all(set(r) == set(lexical) and r["cases"] == 4 for r in results.values())


def test_a_case_postgres_cannot_take_fails_alone_named_by_its_id(
    kb: Path, tmp_path: Path, settings: Settings
) -> None:
    huge = {"id": "huge", "query": "rollback " * 120_000, "expected_paths": ["guides/deploy.md"]}
    nul = {"id": "nul", "query": "roll\x00back", "expected_paths": ["guides/deploy.md"]}
    cases = write_cases(tmp_path / "cases.jsonl", [huge, *CASES[:2], nul, *CASES[2:]])
    assert len(huge["query"]) > 1_000_000

    report = run_evaluation(settings, cases, k=3)

    assert report["cases"] == 6
    clean = run_evaluation(settings, write_cases(tmp_path / "clean.jsonl", CASES), k=3)
    for row, good in zip(report["results"], clean["results"], strict=True):
        assert row["cases"] == 6
        assert [error["id"] for error in row["errors"]] == ["huge", "nul"]
        assert "NUL" in row["errors"][1]["reason"] and "characters" in row["errors"][0]["reason"]
        assert row["failing"] == ["huge", "nul", *good["failing"]]
        # The four others are scored as they are alone; the two broken cases score nothing.
        assert row["mrr"] == pytest.approx(good["mrr"] * 4 / 6, abs=1e-4)


def test_run_evaluation_by_page_scores_both_levels_and_gates_on_them(
    kb: Path, cases_file: Path, settings: Settings
) -> None:
    by_chunk = run_evaluation(settings, cases_file, k=3, modes=["lexical"])
    by_page = run_evaluation(settings, cases_file, k=3, modes=["lexical"], group_by="page")
    assert (by_chunk["group_by"], by_page["group_by"]) == ("chunk", "page")
    assert set(by_page["metric_levels"]) == {
        "results[].<metric>",
        "results[].page.<metric>",
        "results[].chunk.<metric>",
    }
    [row] = by_page["results"]
    assert row["group_by"] == "page" and row["levels"] == {"page": 3, "chunk": 1}
    assert row["page"]["failing"] == ["nowhere"]
    assert gate_failures(by_page["results"], by_page["results"]) == []
    lowered = [{**row, "page": {**row["page"], "mrr": 1.0}}]
    assert gate_failures(by_page["results"], lowered) == [
        f"lexical/-: page.mrr {row['page']['mrr']:.4f} is more than 0.02 below the baseline 1.0000"
    ]
    assert threshold_failures(by_page["results"], {"page.mrr": 1.0})[0].startswith("lexical/-: page.mrr")


def add_second_model(conn: Connection) -> None:
    """A second column (hash, 32 dims) filled for every chunk, as a backfill would leave it."""
    with conn.transaction():
        model = register_model(
            conn, provider="hash", model="other", dimensions=32, status="ready", slug="other_32"
        )
    from pgvector import Vector

    rows = conn.execute("SELECT id, content FROM chunks").fetchall()
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE chunks SET emb_other_32 = %s WHERE id = %s",
            [(Vector(hash_vector(content, 32)), chunk_id) for chunk_id, content in rows],
        )
    from tasks.registry import create_hnsw_index

    create_hnsw_index(conn, model)


def test_eval_cli_prints_json_and_fails_under_a_threshold(
    env: None, kb: Path, cases_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lexical = ["eval", str(cases_file), "--no-prefect", "--mode", "lexical"]
    assert main([*lexical, "--json", "--fail-under", "mrr=0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["results"]] == ["lexical"]
    assert report["gate"] == {"passed": True, "failures": []}

    assert main([*lexical, "--fail-under", "mrr=0.8"]) == 1
    captured = capsys.readouterr()
    assert "lexical  -" in captured.out and "failing lexical/-: nowhere" in captured.out
    assert "quality gate: lexical/-: mrr 0.7500 is under 0.8" in captured.err


def test_eval_cli_gates_on_a_baseline_file(
    env: None, kb: Path, cases_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(cases_file), "--no-prefect", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report))
    assert main(["eval", str(cases_file), "--no-prefect", "--baseline", str(baseline)]) == 0
    capsys.readouterr()

    for result in report["results"]:
        result["mrr"] = min(1.0, result["mrr"] + 0.05)
    baseline.write_text(json.dumps(report))
    assert main(["eval", str(cases_file), "--no-prefect", "--baseline", str(baseline)]) == 1
    assert "more than 0.02 below the baseline" in capsys.readouterr().err


def test_eval_cli_compares_two_columns_side_by_side(
    env: None, kb: Path, cases_file: Path, conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    add_second_model(conn)
    assert main(["eval", str(cases_file), "--no-prefect", "--compare", "test_64", "other_32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    keys = [(r["mode"], r["model"]) for r in report["results"]]
    assert keys == [
        ("vector", "test_64"),
        ("vector", "other_32"),
        ("lexical", None),
        ("hybrid", "test_64"),
        ("hybrid", "other_32"),
    ]

    compare = ["eval", str(cases_file), "--no-prefect", "--compare", "test_64", "other_32"]
    assert main([*compare, "--mode", "hybrid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("hybrid       test_64  other_32    change")
    assert [line.split()[0] for line in lines[header + 1 : header + 8]] == [*METRICS, "failing"]
    change = lines[header + 5].split()  # mrr: first, second, change
    assert float(change[3]) == pytest.approx(float(change[2]) - float(change[1]), abs=1e-4)


def test_eval_cli_refuses_bad_slugs_and_thresholds(
    env: None, kb: Path, cases_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(cases_file), "--no-prefect", "--model", "no such"]) == 1
    assert "invalid model slug 'no such'" in capsys.readouterr().err
    assert main(["eval", str(cases_file), "--no-prefect", "--fail-under", "mrr"]) == 1
    assert "--fail-under needs metric=value" in capsys.readouterr().err
    assert main(["eval", str(cases_file) + ".missing", "--no-prefect"]) == 2


def test_gate_reads_thresholds_and_a_baseline_together(tmp_path: Path) -> None:
    report = {"results": [row("hybrid", "m", mrr=0.6)]}
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"results": [row("hybrid", "m", mrr=0.7)]}))
    assert gate(report, fail_under={"mrr": 0.65}, baseline=baseline) == [
        "hybrid/m: mrr 0.6000 is under 0.65",
        "hybrid/m: mrr 0.6000 is more than 0.02 below the baseline 0.7000",
    ]
    assert gate(report) == []


# --- the flow, through Prefect ----------------------------------------------------------------------


@pytest.mark.prefect
def test_evaluate_flow_publishes_a_table_and_fails_under_a_threshold(
    kb: Path, cases_file: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import evaluate

    monkeypatch.setenv("DATABASE_URL", database_url)  # the worker's environment: never a parameter
    overrides = {
        "embedding_provider": "hash",
        "embedding_model": "test",
        "embedding_dimensions": 64,
    }
    state = evaluate(
        cases=str(cases_file), modes=["lexical"], k=3, settings_overrides=overrides, return_state=True
    )
    assert state.is_completed()
    report: dict[str, Any] = state.result()
    assert report["results"][0]["mrr"] == 0.75
    flow_run_id = state.state_details.flow_run_id

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-metrics"]))
            )
            return [a for a in found if a.flow_run_id == flow_run_id]

    (table,) = asyncio.run(artifacts())
    assert table.type == "table" and '"mrr": 0.75' in str(table.data)

    failed = evaluate(
        cases=str(cases_file),
        modes=["lexical"],
        k=3,
        settings_overrides=overrides,
        fail_under={"mrr": 0.9},
        return_state=True,
    )
    assert failed.is_failed()
    with pytest.raises(QualityGateFailed, match="mrr 0.7500 is under 0.9"):
        failed.result()


# --- the docs-qa fixture, without the model ---------------------------------------------------------


def test_docsqa_cases_file_is_what_the_converter_writes() -> None:
    pages = docsqa.group_pages(docsqa.load_sections(corpus_root("docs-qa")))
    expected = docsqa.cases_jsonl(docsqa.build_cases(docsqa.load_questions(corpus_root("docs-qa")), pages))
    assert docsqa.DEFAULT_CASES.read_text(encoding="utf-8") == expected
    assert len(load_cases(docsqa.DEFAULT_CASES)) == 100


def test_docsqa_tree_has_one_section_per_corpus_chunk(tmp_path: Path) -> None:
    pages = docsqa.group_pages(docsqa.load_sections(corpus_root("docs-qa")))
    written = docsqa.write_tree(tmp_path, pages)
    assert len(written) == len(pages) == 45
    assert (tmp_path / "api" / "index.md").is_file() and (tmp_path / "docs" / "welcome.md").is_file()
    for page in pages:
        doc = parse_document(page.path, (tmp_path / page.path).read_bytes())
        chunks = chunk_document(doc, max_tokens=256)
        assert all(len(chunk.heading_path) == 1 for chunk in chunks), page.path
        headings = list(dict.fromkeys(chunk.heading_path[0] for chunk in chunks))
        assert headings == [section.heading for section in page.sections], page.path
    targets = {(t.path, t.heading) for case in load_cases(docsqa.DEFAULT_CASES) for t in case.targets}
    sections = {(page.path, section.heading) for page in pages for section in page.sections}
    assert targets <= sections


def test_rustbook_cases_name_pages_and_sections_of_the_book() -> None:
    """Written by reading the chapters: each expected section is a heading of its page."""
    root = corpus_root("rust-book/src")
    cases = load_cases(RUSTBOOK_CASES)
    pages = {target.path for case in cases for target in case.targets}
    assert len(cases) >= 100 and len(pages) >= 60 and all(case.level == "chunk" for case in cases)
    headings: dict[str, set[str]] = {}
    for page in pages:
        chunks = chunk_document(parse_document(page, (root / page).read_bytes()), max_tokens=512)
        headings[page] = {heading for chunk in chunks for heading in chunk.heading_path}
    missing = [
        (case.id, target)
        for case in cases
        for target in case.targets
        if target.heading not in headings[target.path]
    ]
    assert missing == []


def test_docsqa_paths_and_titles() -> None:
    urls = ["https://x.test/en/api/", "https://x.test/en/api/errors", "https://x.test/en/docs/welcome"]
    assert docsqa.page_paths(urls) == {
        urls[0]: "api/index.md",
        urls[1]: "api/errors.md",
        urls[2]: "docs/welcome.md",
    }
    assert docsqa.page_title("api/index.md") == "API"
    assert docsqa.page_title("api/ip-addresses.md") == "IP addresses"
    section = docsqa.Section("u#a", "Intro", "Intro\n\n\n# not a heading\nText\n---\n")
    assert docsqa.section_body(section) == "\\# not a heading\nText\n\\---"
    assert docsqa.section_body(docsqa.Section("u#b", "Only", "Only\n\n\n")) == "Only"
