"""File failures reach the Prefect flow run's final state, through a real (ephemeral) server:
some failed -> Completed, named "Completed with failures"; every one failed -> Failed. The
summary stays the result either way, and the CLI exits 3."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import prefect.main  # noqa: F401  # sets up Prefect's log handlers now, not inside a test capturing output
import pytest

from cli.main import EXIT_FILE_FAILURES, main
from tasks.outcome import FilesFailed
from tests.test_ingest import PAGES, write_tree

pytestmark = pytest.mark.prefect

BAD_BYTES = b"# Broken\n\n\xff\xfe not UTF-8\n"


def stored_state(flow_run_id: Any) -> Any:
    """The final state as the server holds it, which is what a UI or a scheduler reads."""
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    return asyncio.run(read())


def test_some_files_failed_completes_named_completed_with_failures(
    prefect_harness: None, env: None, tmp_path: Path
) -> None:
    from flows.ingest import ingest

    kb = write_tree(tmp_path / "kb", {**PAGES, "broken.md": BAD_BYTES})
    state = ingest(source=str(kb), return_state=True)

    assert state.is_completed() and state.name == "Completed with failures"
    assert str(state.message).startswith("1 of ") and "files failed: broken.md" in str(state.message)
    summary = state.result()
    assert summary["documents"]["new"] == 4 and summary["documents"]["failed"] == 1
    stored = stored_state(state.state_details.flow_run_id)
    assert stored.type == state.type and stored.name == "Completed with failures"


def test_every_file_failed_fails_the_run_and_keeps_the_summary(
    prefect_harness: None, env: None, tmp_path: Path
) -> None:
    from flows.ingest import bulk_load, ingest

    kb = write_tree(tmp_path / "kb", {f"broken-{i}.md": BAD_BYTES for i in range(3)})
    for flow in (ingest, bulk_load):
        state = flow(source=str(kb), return_state=True)

        assert state.is_failed(), flow.name
        assert str(state.message).startswith("every file failed: 3 of 3 files failed")
        result = state.result(raise_on_failure=False)
        assert isinstance(result, FilesFailed) and result.summary["documents"]["failed"] == 3
        assert stored_state(state.state_details.flow_run_id).is_failed()
        with pytest.raises(FilesFailed):
            state.result()


def test_a_clean_run_stays_plainly_completed(prefect_harness: None, env: None, tmp_path: Path) -> None:
    from flows.ingest import ingest

    kb = write_tree(tmp_path / "kb", dict(PAGES))
    state = ingest(source=str(kb), return_state=True)
    assert state.is_completed() and state.name == "Completed"
    assert state.result()["documents"]["failed"] == 0


def test_the_cli_in_prefect_mode_exits_3_with_the_summary_when_every_file_failed(
    prefect_harness: None, env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_tree(tmp_path / "kb", {"broken.md": BAD_BYTES})
    assert main(["ingest", str(kb), "--json"]) == EXIT_FILE_FAILURES
    summary = json.loads(capsys.readouterr().out)
    assert summary["failures"][0]["path"] == "broken.md"
