"""Thin Prefect wrappers: each stage is a named task, and one wiring runs with or without Prefect.

Stages take a connection source (the run's pool), never a connection, so a
retried stage borrows a fresh connection instead of reusing a dead one.

Prefect is imported only by a run that uses it: a stage builds its task, and a
flow module its flows, on first use, so a run without Prefect never pays for
the import.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from tasks.errors import is_transient

if TYPE_CHECKING:
    from prefect import Flow, Task
    from prefect.client.schemas.objects import State, TaskRun

P = ParamSpec("P")
R = TypeVar("R")

DATABASE_RETRIES = 3
DATABASE_RETRY_DELAYS = [1.0, 5.0, 20.0]  # seconds before each retry, jittered


def stage_task(name: str, fn: Callable[P, R], *, retries: int = DATABASE_RETRIES) -> Task[P, R]:
    """A task that never caches or persists: stages move chunks and vectors.

    Transient errors (a lost connection, a serialization failure, a deadlock) are
    retried `retries` times; every other error fails the task at once.
    """
    return cast("Task[P, R]", LazyTask(name, fn, retries))


class LazyTask:
    """A stage's Prefect task, built on first use; `fn` and `name` need no Prefect."""

    def __init__(self, name: str, fn: Callable[..., Any], retries: int) -> None:
        self.name, self.fn, self.retries = name, fn, retries
        self._task: Any = None

    @property
    def task(self) -> Any:
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            self._task = task(
                name=self.name,
                cache_policy=NO_CACHE,
                persist_result=False,
                retries=self.retries,
                retry_delay_seconds=DATABASE_RETRY_DELAYS,
                retry_jitter_factor=0.2,
                retry_condition_fn=retry_on_transient_error,
            )(self.fn)
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        # Only for what the instance lacks (submit, map, with_options...); never while unpickling.
        if attribute.startswith("__") or "_task" not in self.__dict__:
            raise AttributeError(attribute)
        return getattr(self.task, attribute)


def prefect_task(stage: Any) -> Any:
    """The Prefect task itself, for APIs that take one (a task runner's `submit`)."""
    return stage.task if isinstance(stage, LazyTask) else stage


def deferred_flow(**options: Any) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """Mark a function as a Prefect flow with these options, built by `flows_on_demand`.

    Typed as the flow it becomes: the module's `__getattr__` is all that hands it out.
    """

    def mark(fn: Callable[P, R]) -> Flow[P, R]:
        fn.__dict__["deferred_flow_options"] = options
        return cast("Flow[P, R]", fn)

    return mark


def flows_on_demand(namespace: dict[str, Any]) -> Callable[[str], Any]:
    """Take a module's `deferred_flow` functions out of it; the returned module `__getattr__`
    builds each as a Prefect flow (same name, same entrypoint) on first access."""
    deferred = {n: f for n, f in namespace.items() if "deferred_flow_options" in getattr(f, "__dict__", {})}
    for name in deferred:
        del namespace[name]

    def module_getattr(name: str) -> Any:
        if name not in deferred:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        from prefect import flow
        from prefect.client.schemas.objects import State

        namespace.setdefault("State", State)  # the flows' return annotations name it
        fn = deferred[name]
        namespace[name] = flow(**vars(fn)["deferred_flow_options"])(fn)
        return namespace[name]

    return module_getattr


def retry_on_transient_error(stage: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's `retry_condition_fn`: the failed state holds the exception the stage raised."""
    failure = state.result(raise_on_failure=False)
    return isinstance(failure, BaseException) and is_transient(failure)


class StageRunner(Protocol):
    def __call__(self, stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R: ...


def run_plain(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage's function directly: no Prefect server, for tests and scripts."""
    return stage.fn(*args, **kwargs)


def run_as_task(stage: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the stage as a Prefect task. Arguments are quoted: Prefect never walks big lists."""
    from prefect.utilities.annotations import quote

    quoted_args: Any = [quote(a) for a in args]
    quoted_kwargs: Any = {k: quote(v) for k, v in kwargs.items()}
    return cast(R, stage(*quoted_args, **quoted_kwargs))


def in_flow_run() -> bool:
    """Whether this runs inside a Prefect flow run; never imports Prefect to find out."""
    if "prefect.context" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


class ProgressReporter:
    """A Prefect progress artifact, updated at most once per percent (a no-op outside a flow run),
    and with `terminal`, a bar of rows done, rate and ETA when stderr is a terminal."""

    def __init__(self, key: str, description: str, *, terminal: bool = False) -> None:
        self._artifact_id: Any = None
        self._last = -1
        self._description = description
        self._bar: Any = None
        self._terminal = terminal and sys.stderr.isatty()
        if in_flow_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def __call__(self, done: int, total: int) -> None:
        if self._terminal:
            self._show(done, total)
        if self._artifact_id is None:
            return
        percent = int(100 * done / total) if total else 100
        if percent != self._last:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self._artifact_id, progress=float(percent))
            self._last = percent

    def _show(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = _start_bar(self._description, total, "rows, ETA")
        progress, task_id = self._bar
        progress.update(task_id, completed=done, total=total)
        if done >= total:
            progress.stop()


class RunProgress:
    """Files and chunks prepared: a progress artifact in a flow run, a bar when stderr is a terminal."""

    def __init__(self, key: str, what: str, files: int) -> None:
        self.files_total, self.files, self.chunks = files, 0, 0
        self._artifact = ProgressReporter(key, f"{what} {files} files")
        self._started = time.monotonic()
        self._bar: Any = None
        if files and sys.stderr.isatty():
            counts = "files, {task.fields[chunks]} chunks, {task.fields[rate]:.1f} chunks/s, ETA"
            self._bar = _start_bar(what, files, counts, chunks=0, rate=0.0)

    def __call__(self, files: int, chunks: int) -> None:
        self.files += files
        self.chunks += chunks
        self._artifact(self.files, self.files_total)
        if self._bar is not None:
            progress, task_id = self._bar
            rate = self.chunks / max(time.monotonic() - self._started, 1e-6)
            progress.update(task_id, advance=files, chunks=self.chunks, rate=rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar[0].stop()


def _start_bar(description: str, total: int, counts: str, **fields: Any) -> tuple[Any, Any]:
    """A rich progress bar on stderr, started: (progress, task id). `counts` labels the numbers."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(counts),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    progress.start()
    return progress, progress.add_task(description, total=total, **fields)
