"""The evaluate flow: load the cases, embed their queries once per model, search them in every
mode, score, publish a table artifact, and (for deployments) fail under a threshold."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from config.settings import Settings
from flows.params import (
    ENVIRONMENT,
    FilePath,
    ModelSlugs,
    Profile,
    ResultsRead,
    SearchModes,
    SearchOptionsOverrides,
    SettingsOverrides,
    Thresholds,
    Tolerance,
    run_settings,
)
from tasks.db import Connection, open_current_database
from tasks.embed import Embedder, Vectors, make_embedder
from tasks.evaluate import (
    GATE_TOLERANCE,
    METRIC_LEVELS,
    EvalCase,
    EvalSummary,
    gate_failures,
    load_cases,
    publish_artifacts,
    run_cases,
    summarize,
    threshold_failures,
)
from tasks.ranking import GroupBy
from tasks.registry import EmbeddingModel
from tasks.search import (
    SEARCH_MODES,
    CorpusStats,
    SearchMode,
    SearchOptions,
    corpus_stats,
    embed_queries,
    options_from_settings,
    query_problem,
    resolve_model,
)
from tasks.stage import StageRunner, run_as_task, run_plain, stage_task

EmbedderFactory = Callable[[EmbeddingModel, Settings], Embedder]
Report = dict[str, Any]


class QualityGateFailed(RuntimeError):
    """Retrieval fell under a threshold or below the baseline; the message lists each miss."""

    def __init__(self, failures: Sequence[str]) -> None:
        super().__init__("retrieval quality gate failed:\n  " + "\n  ".join(failures))
        self.failures = list(failures)


def default_embedder(model: EmbeddingModel, settings: Settings) -> Embedder:
    return make_embedder(model.provider, model.model, model.dimensions, settings)


def embed_case_queries(embedder: Embedder, cases: Sequence[EvalCase], settings: Settings) -> Vectors:
    """One vector per case; a case whose query no search takes gets zeros (it fails when searched)."""
    usable = [index for index, case in enumerate(cases) if query_problem(case.query) is None]
    vectors = np.zeros((len(cases), embedder.dimensions), dtype=np.float32)
    if usable:
        vectors[usable] = embed_queries(embedder, [cases[index].query for index in usable], settings)
    return vectors


def run_mode(
    conn: Connection,
    cases: Sequence[EvalCase],
    options: SearchOptions,
    model: EmbeddingModel | None,
    vectors: Vectors | None,
    stats: CorpusStats,
) -> EvalSummary:
    results = run_cases(conn, cases, options=options, model=model, vectors=vectors, stats=stats)
    return summarize(options.mode, model.slug if model else None, options.k, results, options.group_by)


load_cases_stage = stage_task("load-cases", load_cases)
embed_stage = stage_task("embed-queries", embed_case_queries)
run_mode_stage = stage_task("run-cases", run_mode)


def run_evaluation(
    settings: Settings,
    cases_path: Path,
    *,
    modes: Sequence[SearchMode] = SEARCH_MODES,
    models: Sequence[str | None] = (None,),
    k: int = 10,
    group_by: GroupBy = "chunk",
    runner: StageRunner = run_plain,
    embedder_factory: EmbedderFactory = default_embedder,
    **search_overrides: Any,
) -> Report:
    """Every case in every mode, per model (None: the active one); lexical runs once, needing none.
    Searches return chunks or pages as `group_by` says; both levels are scored either way.

    Returns `{"cases_file", "cases", "k", "group_by", "metric_levels", "results": [one object
    per (mode, model)]}`.
    """
    options = options_from_settings(settings, k=k, group_by=group_by, **search_overrides)
    cases = runner(load_cases_stage, cases_path)
    summaries: list[EvalSummary] = []
    with open_current_database(settings) as conn:
        stats = corpus_stats(conn)
        resolved = _resolve_models(conn, models) if set(modes) - {"lexical"} else []
        for model in resolved:
            vectors = runner(embed_stage, embedder_factory(model, settings), cases, settings)
            for mode in (m for m in modes if m != "lexical"):
                mode_options = _with_mode(options, mode)
                summaries.append(runner(run_mode_stage, conn, cases, mode_options, model, vectors, stats))
        if "lexical" in modes:
            lexical = _with_mode(options, "lexical")
            summaries.append(runner(run_mode_stage, conn, cases, lexical, None, None, stats))
    summaries.sort(key=lambda s: (SEARCH_MODES.index(s.mode), _model_order(s.model, resolved)))
    publish_artifacts(summaries, str(cases_path))
    return {
        "cases_file": str(cases_path),
        "cases": len(cases),
        "k": k,
        "group_by": group_by,
        "metric_levels": METRIC_LEVELS,
        "results": [s.to_dict() for s in summaries],
    }


def _resolve_models(conn: Connection, slugs: Sequence[str | None]) -> list[EmbeddingModel]:
    resolved: list[EmbeddingModel] = []
    for slug in slugs:
        model = resolve_model(conn, slug)
        if model not in resolved:
            resolved.append(model)
    return resolved


def _with_mode(options: SearchOptions, mode: SearchMode) -> SearchOptions:
    return replace(options, mode=mode)


def _model_order(slug: str | None, models: Sequence[EmbeddingModel]) -> int:
    slugs = [m.slug for m in models]
    return slugs.index(slug) if slug in slugs else len(slugs)


def gate(
    report: Report,
    *,
    fail_under: Mapping[str, float] | None = None,
    baseline: Path | None = None,
    tolerance: float = GATE_TOLERANCE,
) -> list[str]:
    """Every threshold missed and every metric more than `tolerance` below the baseline file."""
    failures: list[str] = []
    if fail_under:
        failures += threshold_failures(report["results"], fail_under)
    if baseline is not None:
        expected = json.loads(baseline.read_text(encoding="utf-8"))
        failures += gate_failures(report["results"], expected["results"], tolerance=tolerance)
    return failures


@flow(name="evaluate", log_prints=True)
def evaluate(
    cases: FilePath,
    modes: SearchModes = SEARCH_MODES,
    models: ModelSlugs = None,
    k: ResultsRead = 10,
    search_options: SearchOptionsOverrides | None = None,
    fail_under: Thresholds = None,
    baseline: FilePath | None = None,
    tolerance: Tolerance = GATE_TOLERANCE,
    profile: Profile = ENVIRONMENT,
    settings_overrides: SettingsOverrides | None = None,
    group_by: GroupBy = "chunk",
) -> Report:
    """Measure retrieval on labelled cases: pass@1, pass@3, pass@k, recall@k, MRR and nDCG@10
    per (mode, model). Fails the run when a metric is under `fail_under` or below the baseline.

    Args:
        cases: Path of a JSONL file of cases (id, query, expected_paths, optional namespace and
            expected_headings), as seen by the machine that runs the flow.
        modes: Search modes to measure: vector, lexical, hybrid. Empty: all three.
        models: Model slugs to measure. Empty: the primary model.
        k: Results read per query for pass@k, recall@k and MRR.
        search_options: Advanced: search options (min_score, ef_search, rrf_k). Empty: the settings.
        fail_under: Metric thresholds, e.g. {"mrr": 0.8}; the run fails under any of them.
        baseline: Path of a baseline JSON report; the run fails more than `tolerance` below it.
        tolerance: How far below the baseline a metric may fall.
        profile: Settings profile from config/: dev (local model) or prod (OpenAI). environment: none.
        settings_overrides: Advanced: other settings by field name. Secrets and unknown keys are refused.
        group_by: Search chunks (chunk) or pages, each page once at its best chunk's rank (page).
            Both levels are scored either way.
    """
    settings = run_settings(profile, settings_overrides)
    report = run_evaluation(
        settings,
        Path(cases),
        modes=modes or SEARCH_MODES,
        models=models or [None],
        k=k,
        group_by=group_by,
        runner=run_as_task,
        **(search_options.model_dump(exclude_none=True) if search_options else {}),
    )
    failures = gate(
        report,
        fail_under={str(metric): floor for metric, floor in (fail_under or {}).items()},
        baseline=Path(baseline) if baseline else None,
        tolerance=tolerance,
    )
    if failures:
        raise QualityGateFailed(failures)
    return report
