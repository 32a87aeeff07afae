"""Thin Prefect wrappers: each stage is a named task, and one wiring runs with or without Prefect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

P = ParamSpec("P")
R = TypeVar("R")


def stage_task(name: str, fn: Callable[P, R]) -> Task[P, R]:
    """A task that never caches or persists: stages take connections and move chunks and vectors."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)


class StageRunner(Protocol):
    def __call__(self, stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R: ...


def run_plain(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage's function directly: no Prefect server, for tests and scripts."""
    return stage.fn(*args, **kwargs)


def run_as_task(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage as a Prefect task. Arguments are quoted: Prefect never walks big lists."""
    quoted_args: Any = [quote(a) for a in args]
    quoted_kwargs: Any = {k: quote(v) for k, v in kwargs.items()}
    return stage(*quoted_args, **quoted_kwargs)


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
