"""The backfill flow: register a model, fill its column resumably, index it, and switch over if asked."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, cast

from prefect import flow
from pydantic import Field

from config.settings import ProviderName, Settings, model_key
from flows.params import ENVIRONMENT, ModelNameText, PrecisionChoice, Profile, SettingsOverrides, run_settings
from tasks.backfill import (
    BackfillStats,
    activate,
    build_index,
    check_existing,
    count_over_limit,
    estimate,
    fill_column,
    hold_backfill_lock,
    probe_dimensions,
    set_status,
    validate_request,
)
from tasks.db import connect, connect_migrated, database_url, index_validity
from tasks.embed import Embedder, TerminalEmbeddingError, make_embedder
from tasks.index import vacuum_analyze
from tasks.registry import EmbeddingModel, find_model, register_model, slug_for
from tasks.runners import ClusterAddress, Workers, choose_runner, fill_range_here, fill_ranges_on_cluster
from tasks.stage import ProgressReporter, StageRunner, run_as_task, run_plain, stage_task

Precision = Literal["vector", "halfvec"]


def register_for_backfill(
    conn: Any, settings: Settings, provider: str, model: str, dimensions: int, precision: Precision | None
) -> EmbeddingModel:
    with conn.transaction():
        return register_model(
            conn,
            provider=provider,
            model=model,
            dimensions=dimensions,
            status="backfilling",
            precision=precision,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
        )


register_stage = stage_task("register-model", register_for_backfill)
fill_stage = stage_task("fill-column", fill_column)
fill_range_stage = stage_task("fill-range", fill_range_here)
index_stage = stage_task("build-index", build_index)
vacuum_stage = stage_task("vacuum-analyze", vacuum_analyze)


def run_backfill(
    settings: Settings,
    *,
    provider: str,
    model: str,
    dimensions: int,
    precision: Precision | None = None,
    batch_size: int = 500,
    activate_when_done: bool = False,
    dry_run: bool = False,
    runner: StageRunner = run_plain,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Add (or finish) the column of `provider/model/dimensions`; returns a summary.

    Everything that can refuse the request (its values, the provider settings, the
    dimension probe) runs before the model is registered, so a refusal changes nothing.
    A retired model is registered again, with a new column; its cached vectors still count.
    """
    clock = time.perf_counter()
    validate_request(provider, model, dimensions, precision, batch_size)
    url = database_url(settings)
    with connect_migrated(url) as conn, connect(url) as cache_conn:
        existing = find_model(conn, provider, model, dimensions)
        check_existing(conn, existing, precision)
        if dry_run:
            live = existing if existing is not None and existing.status != "retired" else None
            key = model_key(provider, model, dimensions)
            return _dry_run_summary(
                conn, live, settings, key, embedder or _counter(provider, model, dimensions, settings)
            )
        embedder = embedder or make_embedder(provider, model, dimensions, settings)
        name = existing.slug if existing is not None else slug_for(model, dimensions)
        hold_backfill_lock(conn, model_key(provider, model, dimensions), name)
        probe_dimensions(embedder, settings)
        registered = runner(register_stage, conn, settings, provider, model, dimensions, precision)
        stats = _fill(runner, conn, cache_conn, registered, embedder, settings, batch_size)
        built = runner(index_stage, conn, registered, settings)
        vacuum_seconds = runner(vacuum_stage, conn)
        if registered.status == "backfilling":
            set_status(conn, registered.slug, "ready")
        if activate_when_done:
            activate(conn, registered.slug)
        return _summary(conn, registered, stats, settings, built, vacuum_seconds, clock)


def _fill(
    runner: StageRunner,
    conn: Any,
    cache_conn: Any,
    model: EmbeddingModel,
    embedder: Embedder,
    settings: Settings,
    batch_size: int,
) -> BackfillStats:
    """Fill the column: on a Dask cluster its id ranges go to the workers first (RAGINGEST_WORKERS,
    RAGINGEST_DASK_ADDRESS); the fill here then takes what is left, rows added meanwhile included."""
    ranges: list[BackfillStats] = []
    if choose_runner(settings).kind != "in-process":
        prefect = runner is run_as_task
        ranges = fill_ranges_on_cluster(
            settings, model, fill_range_stage, batch_size=batch_size, prefect=prefect
        )
    stats: BackfillStats = runner(
        fill_stage,
        conn,
        cache_conn,
        model,
        embedder,
        settings,
        batch_size=batch_size,
        progress=ProgressReporter("backfill-progress", f"Backfilling {model.column_name}", terminal=True),
    )
    for part in ranges:
        stats.rows_missing_at_start += part.rows_missing_at_start
        stats.rows_filled += part.rows_filled
        stats.batches += part.batches
        stats.cache_hits += part.cache_hits
        stats.embed.add(part.embed)
    return stats


def _summary(
    conn: Any,
    registered: EmbeddingModel,
    stats: BackfillStats,
    settings: Settings,
    built: bool,
    vacuum_seconds: float,
    clock: float,
) -> dict[str, Any]:
    final = find_model(conn, registered.provider, registered.model, registered.dimensions)
    assert final is not None
    return {
        "dry_run": False,
        "model": _describe(final),
        "rows": {
            "missing_at_start": stats.rows_missing_at_start,
            "filled": stats.rows_filled,
            "remaining": estimate(conn, final, 0.0).rows,
        },
        "embeddings": {
            "cache_hits": stats.cache_hits,
            "embedded": stats.embed.embedded,
            "tokens": stats.embed.tokens,
            "truncated": stats.embed.truncated,
            "retries": stats.embed.retries,
            "estimated_cost_usd": round(stats.embed.tokens * settings.cost_per_million_tokens / 1e6, 6),
        },
        "index": {"built": built, "valid": index_validity(conn).get(final.index_name) is True},
        "seconds": {"vacuum": round(vacuum_seconds, 3), "total": round(time.perf_counter() - clock, 3)},
    }


def _dry_run_summary(
    conn: Any, existing: EmbeddingModel | None, settings: Settings, key: str, embedder: Embedder | None
) -> dict[str, Any]:
    plan = estimate(conn, existing, settings.cost_per_million_tokens)
    return {
        "dry_run": True,
        "model": _describe(existing) if existing else {"model_key": key},
        "rows": {"to_fill": plan.rows},
        "embeddings": {
            "tokens": plan.tokens,
            "estimated_cost_usd": plan.estimated_cost_usd,
            "truncated": None if embedder is None else count_over_limit(conn, existing, embedder),
        },
    }


def _counter(provider: str, model: str, dimensions: int, settings: Settings) -> Embedder | None:
    """The model's embedder for counting its tokens; None where it cannot be made (no API key)."""
    try:
        return make_embedder(provider, model, dimensions, settings)
    except TerminalEmbeddingError:
        return None


def _describe(model: EmbeddingModel) -> dict[str, Any]:
    return {
        "slug": model.slug,
        "model_key": model.model_key,
        "column": model.column_name,
        "precision": model.precision,
        "dimensions": model.dimensions,
        "status": model.status,
    }


@flow(name="backfill", log_prints=True, persist_result=False)
def backfill(
    provider: ProviderName,
    model: ModelNameText,
    dimensions: Annotated[int, Field(ge=1, le=4000)],
    precision: PrecisionChoice = "auto",
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500,
    activate: bool = False,
    dry_run: bool = False,
    profile: Profile = ENVIRONMENT,
    settings_overrides: SettingsOverrides | None = None,
    workers: Workers = None,
    cluster: ClusterAddress = None,
) -> dict[str, Any]:
    """Add an embedding-model column, fill it in resumable batches, index it, and optionally switch to it.

    Args:
        provider: Embedding provider of the new model.
        model: Model name, e.g. text-embedding-3-small.
        dimensions: Vector dimensions of the model (HNSW indexes up to 2,000 as vector, 4,000 as halfvec).
        precision: vector or halfvec. auto: halfvec above 2,000 dimensions, else vector.
        batch_size: Rows per committed batch.
        activate: Make it the primary model once its column is complete and indexed.
        dry_run: Only count the rows, tokens and estimated cost; spend nothing.
        profile: Settings profile from config/: dev (local model) or prod (OpenAI). environment: none.
        settings_overrides: Advanced: other settings by field name. Secrets and unknown keys are refused.
        workers: Fill id ranges on a local Dask cluster of this many processes. Empty: RAGINGEST_WORKERS.
        cluster: Fill id ranges on the Dask cluster at this address. Empty: RAGINGEST_DASK_ADDRESS.
    """
    settings = run_settings(profile, settings_overrides, workers=workers, cluster=cluster)
    return run_backfill(
        settings,
        provider=provider,
        model=model,
        dimensions=dimensions,
        precision=None if precision in (None, "auto") else cast(Precision, precision),
        batch_size=batch_size,
        activate_when_done=activate,
        dry_run=dry_run,
        runner=run_as_task,
    )
