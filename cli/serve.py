"""Subcommands: serve."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(commands: Any) -> None:
    """Add this module's subcommands to the `ragingest` parser."""
    serve = commands.add_parser(
        "serve",
        help="serve every deployment of deployments/prefect.yaml with prefect.serve (no work pool)",
        description="Serve the deployments of deployments/prefect.yaml from this process until "
        "interrupted: scheduled and UI-triggered runs execute here. Set PREFECT_API_URL to a "
        "running `prefect server start` first.",
    )
    serve.add_argument("--only", nargs="+", metavar="NAME", help="serve only these deployments")
    serve.add_argument("--timezone", help="IANA timezone of the nightly schedule (default: prefect.yaml's)")
    serve.add_argument("--nightly-cron", metavar="EXPR", help="cron expression of the nightly schedule")
    serve.add_argument("--limit", type=int, help="most flow runs at once in this process")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Any) -> int:
    from prefect import serve
    from prefect.settings import get_current_settings

    from flows.deployments import read_deployment_specs, served_deployments, with_schedule

    specs = with_schedule(read_deployment_specs(), cron=args.nightly_cron, timezone=args.timezone)
    if args.only:
        unknown = sorted(set(args.only) - {spec.name for spec in specs})
        if unknown:
            raise ValueError(f"no deployment named {', '.join(unknown)} in deployments/prefect.yaml")
        specs = [spec for spec in specs if spec.name in args.only]
    if get_current_settings().api.url is None:
        print(
            "ragingest: PREFECT_API_URL is not set, so runs go to a temporary server that no UI shows; "
            "start `prefect server start` and set PREFECT_API_URL first",
            file=sys.stderr,
        )
    serve(*served_deployments(specs), limit=args.limit)
    return 0
