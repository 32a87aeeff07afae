"""Where a run's shards are prepared: in this process, on a local Dask cluster, or on an existing one.

In this process (the default) nothing new starts: the shards run one after the
other, as they always did. `workers = N` starts a local Dask cluster of N
processes with one thread each for the run and stops it afterwards;
`dask_address` sends the shards to a cluster that is already running. Either
way every shard is the `prepare-shard` task (a plain function without
Prefect), run on a worker that opens its own connections to the same
DATABASE_URL and keeps one embedder per model for its whole life.

Prefect and Dask: a task run on a worker reports to the Prefect API named in
the settings context the flow sends with it. Left unset, every worker would
start a temporary Prefect server of its own, and a worker that is stopped or
killed leaves that server behind. So the runner sends the flow's own API URL
(the real server's, or the flow's temporary one, which local workers reach on
loopback). A cluster on other hosts cannot reach a loopback server: the run is
refused until PREFECT_API_URL names a server the workers can reach.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from config.settings import Settings
from tasks.embed import Embedder, make_embedder
from tasks.registry import EmbeddingModel
from tasks.report import Execution
from tasks.stage import prefect_task

RunnerKind = Literal["in-process", "dask-local", "dask"]
Workers = Annotated[int, Field(ge=1, le=256)] | None
"""Flow parameter: processes of a local Dask cluster; empty keeps RAGINGEST_WORKERS."""
ClusterAddress = Annotated[str, Field(pattern=r"^(tcp|tls)://\S+$")] | None
"""Flow parameter: the scheduler of an existing Dask cluster; empty keeps RAGINGEST_DASK_ADDRESS."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", ""})
IMPORTABLE_PACKAGES = frozenset({"flows", "tasks", "config", "__main__"})
"""Top-level packages a worker imports by name; a flow module outside them is sent by value."""

_embedders: dict[tuple[Any, ...], Embedder] = {}
_embedders_lock = threading.Lock()


class ClusterError(RuntimeError):
    """The cluster cannot be used, or was lost during the run. Nothing was loaded."""

    def __init__(self, message: str, *, address: str | None) -> None:
        super().__init__(message)
        self.address = address


@dataclass(frozen=True, slots=True)
class RunnerChoice:
    """How the shards of a run are prepared."""

    kind: RunnerKind
    workers: int
    """Processes of a local cluster (1 in-process; 0 for an existing cluster until it is asked)."""
    address: str | None = None


def choose_runner(settings: Settings) -> RunnerChoice:
    """The runner the settings ask for; refuses a combination the workers could not serve."""
    if settings.workers and settings.dask_address:
        raise ClusterError(
            "choose --workers N (a local cluster) or --cluster ADDRESS (an existing one), not both",
            address=settings.dask_address,
        )
    if settings.dask_address:
        if settings.database_url is None and not is_loopback(settings.dask_address):
            raise ClusterError(
                f"the Dask workers at {settings.dask_address} cannot reach the embedded Postgres of this"
                " machine; set DATABASE_URL to a Postgres every worker can reach",
                address=settings.dask_address,
            )
        return RunnerChoice("dask", 0, settings.dask_address)
    if settings.workers:
        return RunnerChoice("dask-local", settings.workers)
    return RunnerChoice("in-process", 1)


def is_loopback(address: str) -> bool:
    """Whether a URL or Dask address names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- one embedder per model and process ---------------------------------------------------


def process_embedder(model: EmbeddingModel, settings: Settings) -> Embedder:
    """The embedder of `model` this process keeps: a worker loads a model once, not once per shard.

    Keyed by provider, model, dimensions and precision, and by the settings the
    providers read (endpoint, key, timeout, concurrency), so a changed endpoint
    gets a new client.
    """
    key = (
        model.provider,
        model.model,
        model.dimensions,
        model.precision,
        settings.local_precision,
        settings.openai_base_url,
        settings.openai_api_key,
        settings.embed_timeout_seconds,
        settings.embed_concurrency,
    )
    with _embedders_lock:
        embedder = _embedders.get(key)
        if embedder is None:
            embedder = _embedders[key] = make_embedder(
                model.provider, model.model, model.dimensions, settings
            )
        return embedder


# --- running the shards -----------------------------------------------------------------------


@dataclass(slots=True)
class DaskShards:
    """Prepares shards on Dask: the runner a run uses for `workers` or `dask_address`.

    Called as `(shards, prepare)` like the in-process runner; `prepare` (bound to this
    process's pool and embedders) is not used: each shard is sent as `task(shard,
    settings, process_embedder)`, through Prefect's DaskTaskRunner inside a flow run
    and through a plain `distributed.Client` outside one.
    """

    choice: RunnerChoice
    settings: Settings
    task: Any
    prefect: bool
    workers_seen: int = 0

    def __call__(self, shards: Sequence[Any], prepare: Callable[[Any], Any]) -> list[Any]:
        if not shards:
            return []
        calls = [_shard_call(self, shard) for shard in shards]
        results, self.workers_seen = submit_all(self.choice, self.task, calls, prefect=self.prefect)
        return results


def execution_of(shard_runner: object) -> Execution:
    """The summary's `execution.{runner, workers}`, whichever runner prepared the shards."""
    if isinstance(shard_runner, DaskShards):
        return Execution(shard_runner.choice.kind, shard_runner.workers_seen or shard_runner.choice.workers)
    return Execution()


def shard_runner_for(settings: Settings, task: Any, *, prefect: bool) -> DaskShards | None:
    """The Dask runner the settings ask for, or None for the in-process default."""
    choice = choose_runner(settings)
    if choice.kind == "in-process":
        return None
    return DaskShards(choice, settings, task, prefect)


def _shard_call(runner: DaskShards, shard: Any) -> dict[str, Any]:
    return {"shard": shard, "settings": runner.settings, "embedder_for": process_embedder}


def submit_all(
    choice: RunnerChoice, task: Any, calls: Sequence[dict[str, Any]], *, prefect: bool
) -> tuple[list[Any], int]:
    """Run `task` once per keyword set on the chosen cluster; the results in order, and the workers.

    Inside a flow run each call is a Prefect task run (DaskTaskRunner); outside one, the
    plain function goes through a distributed.Client.
    """
    if prefect:
        return _run_with_prefect(choice, task, calls)
    with _client(choice) as client:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        futures = [client.submit(task.fn, pure=False, **call) for call in calls]
        return _gather(choice, futures, lambda future: future.result()), workers


def _run_with_prefect(
    choice: RunnerChoice, task: Any, calls: Sequence[dict[str, Any]]
) -> tuple[list[Any], int]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = _flow_api_url(choice)
    _send_flow_module_by_value()
    with temporary_settings({PREFECT_API_URL: api_url}), _task_runner(choice, api_url) as task_runner:
        workers = len(task_runner.client.scheduler_info(n_workers=-1)["workers"])
        # Not quoted: Dask would unpack Prefect's quote (a tuple) on the way to the worker.
        futures = [task_runner.submit(prefect_task(task), dict(call)) for call in calls]
        return _gather(choice, futures, lambda future: future.result()), workers


def _gather(choice: RunnerChoice, futures: Sequence[Any], result: Callable[[Any], Any]) -> list[Any]:
    """Each shard's result in order; a lost cluster becomes a ClusterError, a shard's error stays."""
    results = []
    try:
        for future in futures:
            results.append(result(future))
    except BaseException as exc:
        for future in futures:
            getattr(future, "wrapped_future", future).cancel()  # a PrefectDaskFuture wraps Dask's
        if _is_cluster_loss(exc):
            raise ClusterError(
                f"lost the Dask cluster{_at(choice)} after {len(results)} of {len(futures)}"
                f" shards ({type(exc).__name__}: {exc}); nothing was loaded, run again once it is back",
                address=choice.address,
            ) from exc
        raise
    return results


def _is_cluster_loss(exc: BaseException) -> bool:
    import asyncio
    import concurrent.futures

    from distributed.comm.core import CommClosedError

    return isinstance(
        exc, asyncio.CancelledError | concurrent.futures.CancelledError | CommClosedError | OSError
    )


def _at(choice: RunnerChoice) -> str:
    return f" at {choice.address}" if choice.address else ""


def _cluster_kwargs(workers: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A local cluster: N processes, one thread each, no dashboard, on loopback only."""
    return {
        "n_workers": workers,
        "processes": True,
        "threads_per_worker": 1,
        "dashboard_address": None,
        "host": "127.0.0.1",
        "env": env or {},
    }


@contextmanager
def _client(choice: RunnerChoice) -> Iterator[Any]:
    """A distributed.Client on the chosen cluster; a local one is stopped with the client."""
    import distributed

    try:
        if choice.address is not None:
            client = distributed.Client(choice.address, timeout="20s")  # type: ignore[no-untyped-call]
        else:
            cluster = distributed.LocalCluster(**_cluster_kwargs(choice.workers))  # type: ignore[no-untyped-call]
            client = distributed.Client(cluster)  # type: ignore[no-untyped-call]
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler{_at(choice)}: {exc}", address=choice.address
        ) from exc
    with client:
        try:
            yield client
        finally:
            if client.cluster is not None:
                client.cluster.close()


@contextmanager
def _task_runner(choice: RunnerChoice, api_url: str) -> Iterator[Any]:
    from prefect_dask.task_runners import DaskTaskRunner

    if choice.address is not None:
        task_runner = DaskTaskRunner(address=choice.address, client_kwargs={"timeout": "20s"})
    else:
        env = {"PREFECT_API_URL": api_url}
        task_runner = DaskTaskRunner(cluster_kwargs=_cluster_kwargs(choice.workers, env))
    try:
        with task_runner:
            yield task_runner
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler{_at(choice)}: {exc}", address=choice.address
        ) from exc


def _send_flow_module_by_value() -> None:
    """Pickle the flow's module by value when no other process could import it by name.

    A deployment loads `flows/ingest.py` as a top-level module named `ingest`; the flow
    run context sent with every task refers to it, and the scheduler and workers, which
    import `flows.ingest`, would fail to unpickle the task graph.
    """
    import sys

    import cloudpickle
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    module = sys.modules.get(context.flow.fn.__module__) if context and context.flow else None
    if module is not None and module.__name__.split(".")[0] not in IMPORTABLE_PACKAGES:
        cloudpickle.register_pickle_by_value(module)


def _flow_api_url(choice: RunnerChoice) -> str:
    """The API of this flow run, which the workers must report to; refused when they cannot reach it."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.client is None:
        raise ClusterError("Prefect task runs on Dask need a flow run", address=choice.address)
    api_url = str(context.client.api_url).rstrip("/")
    if choice.address is not None and not is_loopback(choice.address) and is_loopback(api_url):
        raise ClusterError(
            f"the Dask workers at {choice.address} cannot reach the Prefect API at {api_url}; start"
            " `prefect server start` where they can reach it and set PREFECT_API_URL on every host",
            address=choice.address,
        )
    return api_url


# --- a backfill's id ranges on the cluster ---------------------------------------------------


def fill_range_here(settings: Settings, model: EmbeddingModel, lo: int, hi: int, batch_size: int) -> Any:
    """Fill one id range of `model`'s column on whichever process runs it (a `fill-range` task).

    It opens its own connections from this process's pool and uses this process's embedder,
    so a worker fills many ranges with one model load; each batch commits on its own.
    """
    from tasks.backfill import fill_range
    from tasks.pool import process_pool

    embedder = process_embedder(model, settings)
    with process_pool(settings).connection() as conn, process_pool(settings).connection() as cache:
        return fill_range(conn, cache, model, embedder, settings, lo, hi, batch_size=batch_size)


def fill_ranges_on_cluster(
    settings: Settings, model: EmbeddingModel, task: Any, *, batch_size: int, prefect: bool, ranges: int = 16
) -> list[Any]:
    """Split the column's NULL rows into id ranges and fill them as `task` (`fill_range_here`) on
    the cluster the settings name; returns each range's statistics. What the ranges leave (rows
    added meanwhile) is for the in-process fill that follows."""
    from tasks.backfill import plan_id_ranges
    from tasks.pool import process_pool

    choice = choose_runner(settings)
    with process_pool(settings).connection() as conn:
        planned = plan_id_ranges(conn, model, max(ranges, choice.workers))
    calls = [
        {"settings": settings, "model": model, "lo": r.lo, "hi": r.hi, "batch_size": batch_size}
        for r in planned
    ]
    return submit_all(choice, task, calls, prefect=prefect)[0] if calls else []
