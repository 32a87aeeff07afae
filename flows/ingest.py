"""The ingest flow: discover, plan, prepare (chunk, cache, embed, stage), load, index, vacuum, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from config.settings import Settings
from flows.params import (
    ENVIRONMENT,
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
    without_arg,
    without_parameter,
)
from tasks.discover import source_identity
from tasks.embed import Embedder, make_embedder
from tasks.index import indexes_missing, vacuum
from tasks.load import LoadRequest, LoadResult, load_run, nothing_to_load
from tasks.outcome import final_state
from tasks.plan import ChangePlan, discover_changes
from tasks.prepare import PrepareStats, Shard, chunk_spec, plan_shards, prepare_shard
from tasks.registry import EmbeddingModel
from tasks.report import RunSummary, StageClock, Summary, publish_artifacts, record_summary
from tasks.run import Run, ingest_models, open_run
from tasks.runners import ClusterAddress, Workers, execution_of, shard_runner_for
from tasks.stage import (
    RunProgress,
    StageRunner,
    deferred_flow,
    flows_on_demand,
    run_as_task,
    run_plain,
    stage_task,
)

EmbedderFactory = Callable[[EmbeddingModel, Settings], Embedder]
ShardRunner = Callable[[Sequence[Shard], Callable[[Shard], PrepareStats]], list[PrepareStats]]
"""Runs `prepare` over the shards, here or on a cluster, and returns each shard's statistics."""


def default_embedder(model: EmbeddingModel, settings: Settings) -> Embedder:
    return make_embedder(model.provider, model.model, model.dimensions, settings)


def shards_in_order(shards: Sequence[Shard], prepare: Callable[[Shard], PrepareStats]) -> list[PrepareStats]:
    """The default runner: every shard in this process, one after the other."""
    return [prepare(shard) for shard in shards]


models_stage = stage_task("register-models", ingest_models)
discover_stage = stage_task("discover", discover_changes)
prepare_stage = stage_task("prepare-shard", prepare_shard)  # idempotent: it replaces its own staged rows
load_stage = stage_task("load-and-index", load_run)
vacuum_stage = stage_task("vacuum-analyze", vacuum)
report_stage = stage_task("report", record_summary)


def run_ingest(
    settings: Settings,
    root: Path,
    *,
    source_name: str | None = None,
    full_refresh: bool = False,
    runner: StageRunner = run_plain,
    embedder_factory: EmbedderFactory = default_embedder,
    shard_runner: ShardRunner = shards_in_order,
) -> Summary:
    """Sync `root` into the database; returns the summary. Wires the stages, nothing more."""
    clock, started_at = StageClock(), datetime.now(UTC)
    with open_run(settings, source_identity(root, source_name)) as run:
        models = runner(models_stage, run, settings)
        embedders = {m.slug: embedder_factory(m, settings) for m in models}
        spec = chunk_spec(settings, list(embedders.values()))
        with clock.stage("discover"):
            plan = runner(discover_stage, run.pool, root, run.source, settings, full_refresh, spec.signature)
        shards = plan_shards(plan.to_prepare, plan.stored, run.key, spec, models, settings.shard_bytes)
        prepared = _prepare_all(shards, shard_runner, runner, run, settings, embedders)
        loaded = _load(run, runner, plan, prepared, models, settings)
        with clock.stage("vacuum"):
            if loaded.chunks_written + loaded.chunks_deleted:
                runner(vacuum_stage, run.pool)
        seconds, cost = clock.seconds(prepared, loaded), settings.cost_per_million_tokens
        slugs, execution = [m.slug for m in models], execution_of(shard_runner)
        summary = RunSummary(run.source, slugs, plan, prepared, loaded, seconds, cost, execution)
        summary.run_id = runner(report_stage, run.pool, summary, started_at)
    publish_artifacts(summary.to_dict())
    return summary.to_dict()


def _prepare_all(
    shards: Sequence[Shard],
    shard_runner: ShardRunner,
    runner: StageRunner,
    run: Run,
    settings: Settings,
    embedders: dict[str, Embedder],
) -> PrepareStats:
    """Every shard through `shard_runner`, in-process ones sharing the run's embedders and pool."""
    files = sum(len(shard.files) for shard in shards)
    progress = RunProgress("ingest-progress", "Chunking and embedding", files)

    def prepare(shard: Shard) -> PrepareStats:
        return runner(prepare_stage, shard, settings, lambda m, _: embedders[m.slug], run.pool, progress)

    total = PrepareStats()
    try:
        for stats in shard_runner(shards, prepare):
            total.add(stats)
    finally:
        progress.close()
    return total


def _load(
    run: Run,
    runner: StageRunner,
    plan: ChangePlan,
    prepared: PrepareStats,
    models: list[EmbeddingModel],
    settings: Settings,
) -> LoadResult:
    """The swap, skipped when the plan is empty and every index is in place."""
    if plan.is_empty() and not indexes_missing(run.pool, models):
        return nothing_to_load(run.pool)
    request = LoadRequest(
        run.key,
        run.source,
        models,
        plan.paths_to_delete(prepared.excluded),
        [f.path for f in plan.failed + prepared.failures],
    )
    return runner(load_stage, run.pool, request, settings)


@deferred_flow(name="ingest", log_prints=True, persist_result=False)
def ingest(
    source: SourcePath,
    full_refresh: bool = False,
    source_name: SourceName = None,
    profile: Profile = ENVIRONMENT,
    include: Globs = None,
    exclude: Globs = None,
    chunker: Chunker = ENVIRONMENT,
    provider: Provider = ENVIRONMENT,
    model: ModelName = None,
    dimensions: Dimensions = None,
    batch_size: BatchSize = None,
    index_strategy: IndexStrategyChoice = ENVIRONMENT,
    settings_overrides: SettingsOverrides | None = None,
    workers: Workers = None,
    cluster: ClusterAddress = None,
) -> Summary:
    """Sync a folder of Markdown into Postgres + pgvector, embedding only what changed.

    Args:
        source: Folder of Markdown pages, as seen by the machine that runs the flow.
        full_refresh: Re-chunk every file, changed or not (cached vectors are still reused).
        source_name: Name the documents are stored under. Empty: the folder's absolute path.
        profile: Settings profile from config/: dev (local model) or prod (OpenAI). environment: none.
        include: Globs of files to ingest, relative to the source. Empty: RAGINGEST_INCLUDE or Markdown.
        exclude: Globs of files to leave out; they win over include. Empty: RAGINGEST_EXCLUDE.
        chunker: headings (sections by heading) or tokens (fixed windows). environment: RAGINGEST_CHUNKER.
        provider: Embedding provider. environment: EMBEDDING_PROVIDER.
        model: Embedding model name. Empty: EMBEDDING_MODEL.
        dimensions: Vector dimensions of the model. Empty: EMBEDDING_DIMENSIONS.
        batch_size: Most texts per embedding request. Empty: RAGINGEST_EMBED_BATCH_INPUTS.
        index_strategy: auto, drop (drop HNSW, load, rebuild) or keep. environment: RAGINGEST_INDEX_STRATEGY.
        settings_overrides: Advanced: other settings by field name. Secrets and unknown keys are refused.
        workers: Prepare on a local Dask cluster of this many processes. Empty: RAGINGEST_WORKERS (0: here).
        cluster: Prepare on the Dask cluster at this address (tcp://host:8786). Empty: RAGINGEST_DASK_ADDRESS.
    """
    return _sync_from_flow(**locals())


@deferred_flow(name="bulk-load", log_prints=True, persist_result=False)
def bulk_load(**parameters: Any) -> Summary:
    """Load a folder at COPY speed: drop the HNSW indexes, load, rebuild them, VACUUM ANALYZE."""
    return _sync_from_flow(**parameters, index_strategy="drop")


# The same sync as `ingest`, with the index strategy forced to `drop`: its parameters and
# form are ingest's without that field. It is a flow of its own because a deployment made
# by `prefect deploy` cannot pin a parameter's value.
without_parameter(bulk_load, ingest, "index_strategy")
bulk_load.__doc__ = f"""{bulk_load.__doc__}

    The same sync as `ingest`, with the index strategy forced to `drop`.

{without_arg(ingest.__doc__ or "", "index_strategy")}"""


def _sync_from_flow(
    source: str,
    full_refresh: bool = False,
    source_name: str | None = None,
    profile: str | None = None,
    settings_overrides: SettingsOverrides | None = None,
    **choices: Any,
) -> Summary:
    """The body both sync flows share: check the folder, build the settings, run the stages as tasks.

    With file failures it returns a state that shows them (`tasks.outcome.final_state`); Prefect
    unwraps it, so a caller still gets the summary, or `FilesFailed` raised when every file failed.
    """
    folder = existing_folder(source)
    settings = run_settings(profile, settings_overrides, **choices)
    summary = run_ingest(
        settings,
        folder,
        source_name=source_name,
        full_refresh=full_refresh,
        runner=run_as_task,
        shard_runner=shard_runner_for(settings, prepare_stage, prefect=True) or shards_in_order,
    )
    return cast(Summary, final_state(summary))


# The flows are built (and Prefect imported) on first access: `ingest --no-prefect` never imports it.
__getattr__ = flows_on_demand(globals())
