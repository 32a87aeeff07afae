"""A sync run's outcome, read from its summary: clean, some files failed, or every file failed.

A run that completed with file failures must be visible to whatever scheduled it:
the CLI exits non-zero, and the Prefect flow run ends in a state that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

Outcome = Literal["clean", "partial", "failed"]
FAILURES_NAMED = 3  # failures quoted in a state message; the summary lists them all


class FilesFailed(RuntimeError):
    """Every file of the run failed. The result of its Failed flow run; carries the summary."""

    def __init__(self, summary: Mapping[str, Any]) -> None:
        super().__init__(f"every file failed: {failure_message(summary)}")
        self.summary = dict(summary)


def run_outcome(summary: Mapping[str, Any]) -> Outcome:
    """`clean`: no file failed. `partial`: some did. `failed`: files failed and none loaded."""
    documents = summary["documents"]
    if not documents["failed"]:
        return "clean"
    loaded = documents["new"] + documents["changed"] + documents["unchanged"]
    return "partial" if loaded else "failed"


def failure_message(summary: Mapping[str, Any]) -> str:
    """`2 of 5 files failed: a.md: invalid UTF-8; b.md: …`, naming the first few."""
    documents, failures = summary["documents"], summary["failures"]
    named = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:FAILURES_NAMED])
    more = f"; and {len(failures) - FAILURES_NAMED} more" if len(failures) > FAILURES_NAMED else ""
    return f"{documents['failed']} of {documents['seen']} files failed: {named}{more}"


def final_state(summary: dict[str, Any]) -> dict[str, Any] | State[dict[str, Any]]:
    """What a sync flow returns: the summary when clean; else a Prefect state that shows the failures.

    Some files failed: Completed, named "Completed with failures", with the summary as its result.
    Every file failed: Failed, with `FilesFailed` (which carries the summary) as its result.
    """
    from prefect.states import Completed, Failed

    outcome = run_outcome(summary)
    if outcome == "clean":
        return summary
    if outcome == "partial":
        return Completed(name="Completed with failures", message=failure_message(summary), data=summary)
    return Failed(message=f"every file failed: {failure_message(summary)}", data=FilesFailed(summary))


def summary_of(result: object) -> dict[str, Any]:
    """The summary from a sync flow run's result (`state.result(raise_on_failure=False)`);
    any other error is raised."""
    if isinstance(result, FilesFailed):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, dict):
        raise TypeError(f"a sync flow returned {type(result).__name__}, not a summary")
    return result
