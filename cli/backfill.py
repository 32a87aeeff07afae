"""Subcommands: `backfill` and `models list|activate|retire`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from config.settings import Settings
from tasks.providers import PROVIDER_NAMES


def register(commands: Any) -> None:
    """Add this module's subcommands to the `ragingest` parser."""
    backfill = commands.add_parser("backfill", help="add an embedding-model column and fill it resumably")
    backfill.add_argument("--provider", required=True, choices=PROVIDER_NAMES)
    backfill.add_argument("--model", required=True)
    backfill.add_argument("--dimensions", required=True, type=int)
    backfill.add_argument("--precision", choices=["vector", "halfvec"])
    backfill.add_argument("--batch-size", type=int, default=500)
    backfill.add_argument("--activate", action="store_true", help="make it the primary model once complete")
    backfill.add_argument("--dry-run", action="store_true", help="count rows, tokens and cost; spend nothing")
    backfill.add_argument("--no-prefect", action="store_true", help="run without a Prefect flow run")
    backfill.add_argument("--json", action="store_true")
    from cli.main import add_cluster_options

    add_cluster_options(backfill)
    backfill.set_defaults(handler=run_backfill_command)

    models = commands.add_parser("models", help="the embedding-model registry")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="models with coverage and index state")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=list_models_command)
    activating = model_commands.add_parser("activate", help="make a model the primary one")
    activating.add_argument("slug")
    activating.add_argument("--force", action="store_true", help="even if its column is not complete")
    activating.set_defaults(handler=activate_command)
    retiring = model_commands.add_parser("retire", help="drop a model's column and index")
    retiring.add_argument("slug")
    retiring.add_argument(
        "--yes", action="store_true", help="confirm: the column and its vectors are dropped"
    )
    retiring.set_defaults(handler=retire_command)


def run_backfill_command(args: argparse.Namespace, settings: Settings) -> int:
    options: dict[str, Any] = {
        "provider": args.provider,
        "model": args.model,
        "dimensions": args.dimensions,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "dry_run": args.dry_run,
    }
    if args.no_prefect:
        from flows.backfill import run_backfill

        summary = run_backfill(settings, activate_when_done=args.activate, **options)
    else:
        from flows.backfill import backfill

        cluster = {"workers": args.workers, "cluster": args.cluster}
        summary = backfill(activate=args.activate, profile=args.profile, **options, **cluster)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(_format_backfill(summary))
    return 0


def _format_backfill(summary: dict[str, Any]) -> str:
    model, rows, embeddings = summary["model"], summary["rows"], summary["embeddings"]
    if summary["dry_run"]:
        return (
            f"dry run for {model['model_key']}: {rows['to_fill']} rows to fill, "
            f"{embeddings['tokens']} tokens, ~${embeddings['estimated_cost_usd']:.4f}; "
            f"{embeddings['truncated'] if embeddings['truncated'] is not None else 'unknown (no model)'}"
            " chunks over the model's input limit would be cut"
        )
    return (
        f"{model['slug']} ({model['model_key']}, {model['precision']}) is {model['status']}: "
        f"{rows['filled']} rows filled, {rows['remaining']} remaining; {embeddings['embedded']} embedded, "
        f"{embeddings['cache_hits']} from the cache, {embeddings['truncated']} cut to the model's limit; "
        f"index {'valid' if summary['index']['valid'] else 'MISSING'}"
    )


def list_models_command(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.db import open_current_database
    from tasks.status import model_coverage

    with open_current_database(settings) as conn:
        models = model_coverage(conn)
    if args.json:
        print(json.dumps(models, sort_keys=True))
        return 0
    print(
        f"{'slug':<32} {'provider':<22} {'model':<26} {'dims':>5} {'precision':<9} {'status':<11}"
        " coverage  index"
    )
    for m in models:
        index = "valid" if m["index_valid"] else ("INVALID" if m["index_present"] else "-")
        print(
            f"{m['slug']:<32} {m['provider']:<22} {m['model']:<26} {m['dimensions']:>5} {m['precision']:<9}"
            f" {m['status']:<11} {m['embedded']}/{m['total']}  {index}"
        )
    return 0


def activate_command(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.backfill import activate
    from tasks.db import open_current_database

    with open_current_database(settings, read_only=False) as conn:
        model = activate(conn, args.slug, force=args.force)
    print(f"{model.slug} is now the primary model")
    return 0


def retire_command(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.backfill import retire
    from tasks.db import open_current_database

    if not args.yes:
        print(
            f"retiring {args.slug} drops its column and every vector in it; run again with --yes to confirm"
        )
        return 2
    with open_current_database(settings, read_only=False) as conn:
        model = retire(conn, args.slug)
    print(f"{model.slug} is retired: column {model.column_name} and its index are dropped")
    return 0
