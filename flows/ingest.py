"""The ingest flow: discover, plan, prepare (chunk, cache, embed, stage), load, index, vacuum, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow

from config.settings import Settings
from flows.params import (
    BatchSize,
    Chunker,
    Dimensions,
    Globs,
    IndexStrategyChoice,
    ModelName,
    Profile,
    Provider,
    SettingsOverrides,
    SourceName,
    SourcePath,
    existing_folder,
    run_settings,
)
from tasks.db import connect, connect_migrated, database_url
from tasks.discover import walk_source
from tasks.embed import Embedder, make_embedder
from tasks.load import (
    IndexPlan,
    LoadResult,
    acquire_load_lock,
    choose_index_plan,
    count_chunks,
    create_staging,
    release_load_lock,
    swap_in,
    vacuum_analyze,
)
from tasks.plan import ChangePlan, plan_changes, stored_hashes
from tasks.prepare import ModelTarget, PrepareStats, prepare_changes
from tasks.registry import EmbeddingModel, ensure_ingest_model
from tasks.report import Summary, publish_artifacts, record_run
from tasks.stage import ProgressReporter, StageRunner, run_as_task, run_plain, stage_task

EmbedderFactory = Callable[[EmbeddingModel, Settings], Embedder]


def default_embedder(model: EmbeddingModel, settings: Settings) -> Embedder:
    return make_embedder(model.provider, model.model, model.dimensions, settings)


def discover_and_plan(
    conn: Any, root: Path, source: str, settings: Settings, full_refresh: bool
) -> ChangePlan:
    found = walk_source(
        root, include=settings.include, exclude=settings.exclude, max_bytes=settings.max_file_bytes
    )
    return plan_changes(found, stored_hashes(conn, source), full_refresh=full_refresh)


discover_stage = stage_task("discover", discover_and_plan)
prepare_stage = stage_task("chunk-and-embed", prepare_changes, retries=0)  # it stages rows: not idempotent
load_stage = stage_task("load-and-index", swap_in)
vacuum_stage = stage_task("vacuum-analyze", vacuum_analyze)
report_stage = stage_task("report", record_run)


def run_ingest(
    settings: Settings,
    root: Path,
    *,
    source_name: str | None = None,
    full_refresh: bool = False,
    runner: StageRunner = run_plain,
    embedder_factory: EmbedderFactory = default_embedder,
) -> Summary:
    """Sync `root` into the database; returns the summary. Wires the stages, nothing more."""
    clock = time.perf_counter()
    started_at = datetime.now(UTC)
    root = root.resolve()
    source = source_name or str(root)
    url = database_url(settings)
    with connect_migrated(url) as conn, connect(url, autocommit=True) as cache_conn:
        acquire_load_lock(conn, settings.lock_timeout_seconds)
        try:
            models = ensure_ingest_model(conn, settings)
            targets = [ModelTarget(m, embedder_factory(m, settings)) for m in models]
            seconds: dict[str, float] = {}
            mark = time.perf_counter()
            plan = runner(discover_stage, conn, root, source, settings, full_refresh)
            seconds["discover"] = time.perf_counter() - mark
            create_staging(conn)
            prepared = runner(
                prepare_stage,
                plan.to_prepare,
                stage_conn=conn,
                cache_conn=cache_conn,
                targets=targets,
                settings=settings,
                progress=ProgressReporter(
                    "ingest-progress", f"Chunking and embedding {len(plan.to_prepare)} files"
                ),
            )
            stored = {f.path for f in plan.changed} | set(plan.deleted)
            deleted = plan.deleted + [path for path in prepared.excluded if path in stored]
            failures = plan.failed + prepared.failures
            index_plan = plan_index(conn, settings, source, plan, prepared, deleted)
            loaded = runner(
                load_stage,
                conn,
                source=source,
                models=models,
                deleted_paths=deleted,
                stale_paths=[f.path for f in failures],
                index_plan=index_plan,
                maintenance_work_mem=settings.maintenance_work_mem,
                parallel_workers=settings.max_parallel_maintenance_workers,
            )
            changed_rows = loaded.chunks_written + loaded.chunks_deleted
            seconds["vacuum"] = runner(vacuum_stage, conn) if changed_rows else 0.0
        finally:
            release_load_lock(conn)
        summary = build_summary(
            source=source,
            models=models,
            plan=plan,
            prepared=prepared,
            loaded=loaded,
            index_plan=index_plan,
            failures=failures,
            seconds=seconds,
            total=time.perf_counter() - clock,
            cost_per_million=settings.cost_per_million_tokens,
        )
        summary["run_id"] = runner(report_stage, conn, summary, started_at, failures)
    publish_artifacts(summary)
    return summary


def plan_index(
    conn: Any, settings: Settings, source: str, plan: ChangePlan, prepared: PrepareStats, deleted: list[str]
) -> IndexPlan:
    replaced_paths = [f.path for f in plan.changed] + deleted
    row = conn.execute(
        "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE d.source = %s AND d.path = ANY(%s)",
        (source, replaced_paths),
    ).fetchone()
    replaced = int(row[0]) if row else 0
    return choose_index_plan(
        settings.index_strategy,
        rows_changed=prepared.chunks + replaced,
        table_rows=count_chunks(conn),
        drop_fraction=settings.auto_drop_fraction,
        drop_min_rows=settings.auto_drop_min_rows,
    )


def build_summary(
    *,
    source: str,
    models: list[EmbeddingModel],
    plan: ChangePlan,
    prepared: PrepareStats,
    loaded: LoadResult,
    index_plan: IndexPlan,
    failures: list[Any],
    seconds: dict[str, float],
    total: float,
    cost_per_million: float,
) -> Summary:
    failed_paths = {f.path for f in failures} | set(prepared.excluded)
    embed = prepared.embed
    return {
        "source": source,
        "models": [m.slug for m in models],
        "documents": {
            "seen": len(plan.new) + len(plan.changed) + len(plan.unchanged) + len(plan.failed),
            "new": sum(1 for f in plan.new if f.path not in failed_paths),
            "changed": sum(1 for f in plan.changed if f.path not in failed_paths),
            "unchanged": len(plan.unchanged),
            "deleted": loaded.documents_deleted,
            "failed": len(failures),
            "excluded": len(prepared.excluded),
        },
        "chunks": {
            "written": loaded.chunks_written,
            "deleted": loaded.chunks_deleted,
            "total": loaded.chunks_total,
        },
        "embeddings": {
            "cache_hits": prepared.cache_hits,
            "cache_misses": prepared.cache_misses,
            "embedded": embed.embedded,
            "tokens": embed.tokens,
            "truncated": embed.truncated,
            "retries": embed.retries,
            "batches": embed.batches,
            "estimated_cost_usd": round(embed.tokens * cost_per_million / 1_000_000, 6),
        },
        "failures": [{"path": f.path, "reason": f.reason} for f in failures],
        "skipped": [{"path": f.path, "reason": f.reason} for f in prepared.empty]
        + [{"path": path, "reason": "rag_include: false"} for path in prepared.excluded],
        "index": {
            "strategy": index_plan.strategy,
            "dropped": loaded.indexes_dropped,
            "rebuilt": loaded.indexes_built,
            "reason": index_plan.reason,
        },
        "seconds": {
            "discover": round(seconds.get("discover", 0.0), 3),
            "chunk": round(prepared.chunk_seconds, 3),
            "cache": round(prepared.cache_seconds, 3),
            "embed": round(embed.seconds, 3),
            "stage": round(prepared.stage_seconds, 3),
            "load": round(loaded.load_seconds, 3),
            "index": round(loaded.index_seconds, 3),
            "vacuum": round(seconds.get("vacuum", 0.0), 3),
            "total": round(total, 3),
        },
    }


@flow(name="ingest", log_prints=True, persist_result=False)
def ingest(
    source: SourcePath,
    full_refresh: bool = False,
    source_name: SourceName = None,
    profile: Profile = None,
    include: Globs = None,
    exclude: Globs = None,
    chunker: Chunker = None,
    provider: Provider = None,
    model: ModelName = None,
    dimensions: Dimensions = None,
    batch_size: BatchSize = None,
    index_strategy: IndexStrategyChoice = None,
    settings_overrides: SettingsOverrides = None,
) -> Summary:
    """Sync a folder of Markdown into Postgres + pgvector, embedding only what changed.

    Args:
        source: Folder of Markdown pages, as seen by the machine that runs the flow.
        full_refresh: Re-chunk every file, changed or not (cached vectors are still reused).
        source_name: Name the documents are stored under. Empty: the folder's absolute path.
        profile: Settings profile from config/ (dev: local model; prod: OpenAI). Empty: the environment.
        include: Globs of files to ingest, relative to the source. Empty: RAGINGEST_INCLUDE or Markdown.
        exclude: Globs of files to leave out; they win over include. Empty: RAGINGEST_EXCLUDE.
        chunker: headings (sections by heading) or tokens (fixed windows). Empty: RAGINGEST_CHUNKER.
        provider: Embedding provider. Empty: EMBEDDING_PROVIDER.
        model: Embedding model name. Empty: EMBEDDING_MODEL.
        dimensions: Vector dimensions of the model. Empty: EMBEDDING_DIMENSIONS.
        batch_size: Most texts per embedding request. Empty: RAGINGEST_EMBED_BATCH_INPUTS.
        index_strategy: auto, drop (drop HNSW, load, rebuild) or keep. Empty: RAGINGEST_INDEX_STRATEGY.
        settings_overrides: Advanced: any other setting by field name. Secrets are refused here.
    """
    return _sync_from_flow(
        source,
        full_refresh,
        source_name,
        profile,
        settings_overrides,
        include=include,
        exclude=exclude,
        chunker=chunker,
        provider=provider,
        model=model,
        dimensions=dimensions,
        batch_size=batch_size,
        index_strategy=index_strategy,
    )


@flow(name="bulk-load", log_prints=True, persist_result=False)
def bulk_load(
    source: SourcePath,
    full_refresh: bool = False,
    source_name: SourceName = None,
    profile: Profile = None,
    include: Globs = None,
    exclude: Globs = None,
    chunker: Chunker = None,
    provider: Provider = None,
    model: ModelName = None,
    dimensions: Dimensions = None,
    batch_size: BatchSize = None,
    settings_overrides: SettingsOverrides = None,
) -> Summary:
    """Load a folder at COPY speed: drop the HNSW indexes, load, rebuild them, VACUUM ANALYZE.

    The same sync as `ingest`, with the index strategy forced to `drop`.

    Args:
        source: Folder of Markdown pages, as seen by the machine that runs the flow.
        full_refresh: Re-chunk every file, changed or not (cached vectors are still reused).
        source_name: Name the documents are stored under. Empty: the folder's absolute path.
        profile: Settings profile from config/ (dev: local model; prod: OpenAI). Empty: the environment.
        include: Globs of files to ingest, relative to the source. Empty: RAGINGEST_INCLUDE or Markdown.
        exclude: Globs of files to leave out; they win over include. Empty: RAGINGEST_EXCLUDE.
        chunker: headings (sections by heading) or tokens (fixed windows). Empty: RAGINGEST_CHUNKER.
        provider: Embedding provider. Empty: EMBEDDING_PROVIDER.
        model: Embedding model name. Empty: EMBEDDING_MODEL.
        dimensions: Vector dimensions of the model. Empty: EMBEDDING_DIMENSIONS.
        batch_size: Most texts per embedding request. Empty: RAGINGEST_EMBED_BATCH_INPUTS.
        settings_overrides: Advanced: any other setting by field name. Secrets are refused here.
    """
    return _sync_from_flow(
        source,
        full_refresh,
        source_name,
        profile,
        settings_overrides,
        include=include,
        exclude=exclude,
        chunker=chunker,
        provider=provider,
        model=model,
        dimensions=dimensions,
        batch_size=batch_size,
        index_strategy="drop",
    )


def _sync_from_flow(
    source: str,
    full_refresh: bool,
    source_name: str | None,
    profile: str | None,
    settings_overrides: dict[str, Any] | None,
    **choices: Any,
) -> Summary:
    """The body both sync flows share: check the folder, build the settings, run the stages as tasks."""
    folder = existing_folder(source)
    settings = run_settings(profile, settings_overrides, **choices)
    return run_ingest(
        settings, folder, source_name=source_name, full_refresh=full_refresh, runner=run_as_task
    )
