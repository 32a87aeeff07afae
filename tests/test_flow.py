"""The ingest flow through a real (ephemeral) Prefect server: named tasks, artifacts, summary."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.test_ingest import PAGES, write_tree

pytestmark = pytest.mark.prefect


def test_ingest_flow_runs_named_tasks_and_publishes_artifacts(
    prefect_harness: None, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest

    kb = write_tree(tmp_path / "kb", dict(PAGES))
    monkeypatch.setenv("DATABASE_URL", database_url)  # the worker's environment: never a parameter
    overrides = {
        "embedding_provider": "hash",
        "embedding_model": "test",
        "embedding_dimensions": 64,
    }
    state = ingest(source=str(kb), settings_overrides=overrides, return_state=True)
    assert state.is_completed()
    summary: dict[str, Any] = state.result()
    assert summary["documents"]["new"] == 4
    flow_run_id = state.state_details.flow_run_id

    async def inspect() -> tuple[list[str], dict[str, Any]]:
        async with get_client() as client:
            task_runs = await client.read_task_runs()
            names = sorted(
                {run.name.rsplit("-", 1)[0] for run in task_runs if run.flow_run_id == flow_run_id}
            )
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["ingest-summary", "ingest-failures"])
                )
            )
            return names, {a.key: a for a in artifacts if a.flow_run_id == flow_run_id}

    names, artifacts = asyncio.run(inspect())
    assert names == [
        "discover",
        "load-and-index",
        "prepare-shard",
        "register-models",
        "report",
        "vacuum-analyze",
    ]
    table = artifacts["ingest-summary"]
    assert table.type == "table"
    assert '"documents.new"' in str(table.data) and "ingest-failures" in artifacts
