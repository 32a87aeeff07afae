"""Subcommands: search and eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from config.settings import Settings

if TYPE_CHECKING:
    from tasks.db import Connection
    from tasks.search import PageHit, SearchFilters, SearchHit, SearchMode, SearchOptions

EXIT_FAILED = 1
EXIT_USAGE = 2
MODES = ("vector", "lexical", "hybrid")
GROUPINGS = ("chunk", "page")


def register(commands: Any) -> None:
    """Add this module's subcommands to the `ragingest` parser."""
    _add_search(commands)
    _add_eval(commands)


def _add_search(commands: Any) -> None:
    search = commands.add_parser("search", help="search the chunks; every hit with its citation")
    search.add_argument("query", help="what to look for")
    search.add_argument("-k", type=_positive, default=10, help="hits to return (default 10)")
    search.add_argument("--mode", choices=MODES, default="hybrid", help="default: hybrid")
    search.add_argument("--model", metavar="SLUG", help="embedding column (default: the active model)")
    search.add_argument("--namespace", help="only pages in this namespace")
    search.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only chunks whose metadata or page frontmatter has KEY=VALUE (repeatable)",
    )
    _add_search_knobs(search)
    search.add_argument(
        "--group-by",
        choices=GROUPINGS,
        default="chunk",
        help="chunk (default): the k best chunks; page: the k best pages, each once with its chunks cited",
    )
    search.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    search.set_defaults(handler=_search)


def _add_eval(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="measure retrieval on labelled cases (JSON lines)")
    evaluate.add_argument(
        "cases", type=Path, help="JSON lines: id, query, expected_paths[, expected_headings, namespace]"
    )
    evaluate.add_argument(
        "--mode",
        action="append",
        choices=MODES,
        dest="modes",
        help="repeatable; default: vector, lexical and hybrid",
    )
    models = evaluate.add_mutually_exclusive_group()
    models.add_argument("--model", metavar="SLUG", help="embedding column (default: the active model)")
    models.add_argument("--compare", nargs=2, metavar=("SLUG_A", "SLUG_B"), help="two columns side by side")
    evaluate.add_argument("-k", type=_positive, default=10, help="cut-off of pass@k, recall@k, MRR (10)")
    evaluate.add_argument(
        "--group-by",
        choices=GROUPINGS,
        default="chunk",
        help="search chunks (default) or pages; both levels are scored either way",
    )
    _add_search_knobs(evaluate)
    evaluate.add_argument(
        "--fail-under",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="exit 1 when any (mode, model) scores under VALUE (repeatable), e.g. mrr=0.8",
    )
    evaluate.add_argument("--baseline", type=Path, help="an `eval --json` file to gate on")
    evaluate.add_argument("--tolerance", type=float, default=0.02, help="allowed drop under the baseline")
    evaluate.add_argument("--no-prefect", action="store_true", help="run without a Prefect flow run")
    evaluate.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    evaluate.set_defaults(handler=_eval)


def _add_search_knobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-score", type=float, help="minimum cosine similarity of a hit (vector, hybrid)")
    parser.add_argument("--ef-search", type=_positive, help="hnsw.ef_search for the vector side")
    parser.add_argument("--rrf-k", type=_positive, help="the k of Reciprocal Rank Fusion (default 60)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    return {"min_score": args.min_score, "ef_search": args.ef_search, "rrf_k": args.rrf_k}


# --- search -------------------------------------------------------------------------------


def _search(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.db import open_current_database
    from tasks.search import SearchFilters, SearchResult, format_hits, options_from_settings, parse_where

    options = options_from_settings(
        settings, mode=args.mode, k=args.k, group_by=args.group_by, **_knobs(args)
    )
    filters = SearchFilters(namespace=args.namespace, where=parse_where(args.where))
    with open_current_database(settings) as conn:
        slug, hits = run_search(conn, settings, args.query, options, filters, args.model)
    result = SearchResult(args.query, options, filters, slug, hits)
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else format_hits(result))
    return 0


def run_search(
    conn: Connection,
    settings: Settings,
    query: str,
    options: SearchOptions,
    filters: SearchFilters,
    slug: str | None,
) -> tuple[str | None, list[SearchHit] | list[PageHit]]:
    """Resolve the model, embed the query with it (not for lexical), and search (chunks or pages,
    as `options.group_by` says); returns the slug and hits."""
    from tasks.embed import make_embedder
    from tasks.registry import validate_slug
    from tasks.search import check_query, embed_queries, resolve_model, search_any

    check_query(query)
    if slug is not None:
        validate_slug(slug)
    if options.mode == "lexical":
        return None, search_any(conn, query, options=options, filters=filters)
    model = resolve_model(conn, slug)
    embedder = make_embedder(model.provider, model.model, model.dimensions, settings)
    (vector,) = embed_queries(embedder, [query], settings)
    return model.slug, search_any(conn, query, options=options, filters=filters, model=model, vector=vector)


# --- eval ---------------------------------------------------------------------------------


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from flows.evaluate import gate
    from tasks.evaluate import (
        format_comparison,
        format_errors,
        format_failing,
        format_table,
        headline_note,
        parse_threshold,
    )

    thresholds = dict(parse_threshold(item) for item in args.fail_under)
    if not args.cases.is_file():
        print(f"ragingest: error: {args.cases} is not a file", file=sys.stderr)
        return EXIT_USAGE
    models: list[str | None] = list(args.compare) if args.compare else [args.model]
    modes = cast("list[SearchMode]", args.modes or list(MODES))
    report = _run_evaluation(args, settings, modes, models)
    failures = gate(report, fail_under=thresholds, baseline=args.baseline, tolerance=args.tolerance)
    report["gate"] = {"passed": not failures, "failures": failures}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(f"{report['cases']} cases from {report['cases_file']}, k={report['k']}, by {args.group_by}")
        print(headline_note(report["results"]))
        print(format_table(report["results"]))
        if args.compare:
            print()
            print(format_comparison(report["results"], *args.compare))
        for lines in (format_failing(report["results"]), format_errors(report["results"])):
            if lines:
                print(lines)
    for failure in failures:
        print(f"quality gate: {failure}", file=sys.stderr)
    return EXIT_FAILED if failures else 0


def _run_evaluation(
    args: argparse.Namespace, settings: Settings, modes: list[SearchMode], models: list[str | None]
) -> dict[str, Any]:
    knobs = {key: value for key, value in _knobs(args).items() if value is not None}
    if args.no_prefect:
        from flows.evaluate import run_evaluation

        return run_evaluation(
            settings, args.cases, modes=modes, models=models, k=args.k, group_by=args.group_by, **knobs
        )
    from flows.evaluate import evaluate
    from flows.params import SearchOptionsOverrides, SettingsOverrides

    report: dict[str, Any] = evaluate(
        cases=str(args.cases),
        modes=tuple(modes),
        models=models,
        k=args.k,
        group_by=args.group_by,
        profile=args.profile,
        settings_overrides=SettingsOverrides.model_validate(dict(args.settings_overrides)),
        search_options=SearchOptionsOverrides.model_validate(knobs),
    )
    return report
