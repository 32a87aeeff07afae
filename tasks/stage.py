"""Thin Prefect wrappers: each stage is a named task, and one wiring runs with or without Prefect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import psycopg
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

P = ParamSpec("P")
R = TypeVar("R")

DATABASE_RETRIES = 3
DATABASE_RETRY_DELAYS = [1.0, 5.0, 20.0]  # seconds before each retry, jittered

# SQLSTATEs worth another attempt: the same work can succeed once the other session is gone.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
    }
)
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08"})  # connection exception


def stage_task(name: str, fn: Callable[P, R], *, retries: int = DATABASE_RETRIES) -> Task[P, R]:
    """A task that never caches or persists: stages take connections and move chunks and vectors.

    Transient database errors (serialization failure, deadlock, lost connection) are
    retried `retries` times; every other error fails the task at once.
    """
    return task(
        name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=retries,
        retry_delay_seconds=DATABASE_RETRY_DELAYS,
        retry_jitter_factor=0.2,
        retry_condition_fn=retry_on_transient_database_error,
    )(fn)


def is_transient_database_error(exc: BaseException) -> bool:
    """Classified by SQLSTATE, never by message; an error without one lost its connection."""
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return exc.sqlstate in TRANSIENT_SQLSTATES or exc.sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES


def retry_on_transient_database_error(stage: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's `retry_condition_fn`: the failed state holds the exception the stage raised."""
    failure = state.result(raise_on_failure=False)
    return isinstance(failure, BaseException) and is_transient_database_error(failure)


class StageRunner(Protocol):
    def __call__(self, stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R: ...


def run_plain(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage's function directly: no Prefect server, for tests and scripts."""
    return stage.fn(*args, **kwargs)


def run_as_task(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage as a Prefect task. Arguments are quoted: Prefect never walks big lists."""
    quoted_args: Any = [quote(a) for a in args]
    quoted_kwargs: Any = {k: quote(v) for k, v in kwargs.items()}
    return cast(R, stage(*quoted_args, **quoted_kwargs))


class ProgressReporter:
    """A Prefect progress artifact, updated at most once per percent; a no-op outside a flow run."""

    def __init__(self, key: str, description: str) -> None:
        self._artifact_id: Any = None
        self._last = -1
        if FlowRunContext.get() is not None:
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def __call__(self, done: int, total: int) -> None:
        if self._artifact_id is None:
            return
        percent = int(100 * done / total) if total else 100
        if percent != self._last:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self._artifact_id, progress=float(percent))
            self._last = percent
