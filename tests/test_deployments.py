"""Deployments through a real `prefect server start`: prefect.yaml, a process worker, `ragingest serve`.

Also the pieces the deployments rely on: typed parameters refused by the server,
stage retries by SQLSTATE, and embedding calls under Prefect global limits.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from psycopg import sql

from flows.deployments import read_deployment_specs, served_deployment, with_schedule
from flows.params import ParameterError, checked_overrides, existing_folder, run_settings
from tasks.db import Connection, connect
from tasks.embed import EmbedItem, EmbedPolicy, HashEmbedder, Vectors, embed_items
from tasks.stage import is_transient_database_error
from tests.test_ingest import PAGES, write_tree

CHECKOUT = Path(__file__).resolve().parents[1]
PREFECT_YAML = CHECKOUT / "deployments" / "prefect.yaml"
BIN = Path(sys.executable).parent
READY_SECONDS = 120.0
COMMAND_SECONDS = 180.0
RUN_SECONDS = 240.0
API_KEY = "sk-test-" + uuid.uuid4().hex  # must never reach a log line
DEPLOYMENTS = ["nightly-ingest", "bulk-load", "backfill-model", "evaluate"]


# --- a real Prefect server, and the commands a user would type ----------------------------


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    client_home: Path
    """PREFECT_HOME of every client command (deploy, worker, serve), apart from the server's."""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.client_home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_TO_API_ENABLED="true",
            HF_HUB_OFFLINE="1",
        )
        env.update(extra)
        return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def background(
    command: Sequence[str], env: dict[str, str], log: Path, cwd: Path = CHECKOUT
) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess in its own process group, killed with all its children on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def wait_until_healthy(api_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited with {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"prefect server not healthy after {READY_SECONDS:.0f} s:\n{tail(log)}")


def prefect_command(server: PrefectServer, *args: str, log: Path) -> str:
    """A `prefect` command as the README types it; fails the test with its output."""
    result = subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=CHECKOUT,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
    )
    output = result.stdout + result.stderr
    log.write_text(output)
    if result.returncode != 0:
        pytest.fail(f"prefect {' '.join(args)} exited with {result.returncode}:\n{output[-3000:]}")
    return output


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    server = PrefectServer(f"http://127.0.0.1:{port}/api", root / "client-home")
    env = server.env(
        PREFECT_HOME=str(root / "server-home"),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
    )
    del env["PREFECT_API_URL"]
    log = root / "server.log"
    with background([str(BIN / "prefect"), "server", "start"], env, log) as process:
        wait_until_healthy(server.api_url, process, log)
        try:
            yield server
        finally:
            drain_client_services()


def drain_client_services() -> None:
    """Flush and stop this process's Prefect event and log workers while the server still answers.

    They are process-wide and bound to the server they first talked to; left running, they
    would keep sending to a stopped server and hang the next module's Prefect teardown.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> PrefectServer:
    """The README's steps: a process work pool, then every deployment of prefect.yaml."""
    logs = tmp_path_factory.mktemp("deploy")
    prefect_command(
        prefect_server, "work-pool", "create", "ragingest", "--type", "process", log=logs / "pool.log"
    )
    prefect_command(
        prefect_server,
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        "deployments/prefect.yaml",
        log=logs / "deploy.log",
    )
    return prefect_server


@contextmanager
def api(server: PrefectServer) -> Iterator[None]:
    """Point this process's Prefect client at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def call(server: PrefectServer, action: Any) -> Any:
    """Run `action(client)` against the test server."""
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await action(client)

    with api(server):
        return asyncio.run(run())


def deployment(server: PrefectServer, name: str) -> Any:
    return call(server, lambda client: client.read_deployment_by_name(name))


def start_run(server: PrefectServer, name: str, parameters: dict[str, Any]) -> uuid.UUID:
    async def create(client: Any) -> uuid.UUID:
        target = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(target.id, parameters=parameters)
        return run.id  # type: ignore[no-any-return]

    return call(server, create)  # type: ignore[no-any-return]


def wait_for_final_state(
    server: PrefectServer, flow_run_id: uuid.UUID, process: subprocess.Popen[bytes], log: Path
) -> Any:
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        run = call(server, lambda client: client.read_flow_run(flow_run_id))
        if run.state is not None and run.state.is_final():
            return run
        if process.poll() is not None:
            pytest.fail(f"the runner exited with {process.returncode} before the run finished:\n{tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"flow run {flow_run_id} not finished after {RUN_SECONDS:.0f} s:\n{tail(log)}")


def run_artifacts(server: PrefectServer, flow_run_id: uuid.UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = call(
        server,
        lambda client: client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        ),
    )
    return {artifact.key: artifact for artifact in artifacts}


def run_logs(server: PrefectServer, flow_run_id: uuid.UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = call(
        server, lambda client: client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    )
    return [log.message for log in logs]


def table_values(artifact: Any) -> dict[str, Any]:
    import json

    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {row["metric"]: row["value"] for row in rows}


def hash_parameters(source: Path) -> dict[str, Any]:
    return {"source": str(source), "provider": "hash", "model": "test", "dimensions": 64}


def storage_files(home: Path) -> list[Path]:
    storage = home / "storage"
    return [p for p in storage.rglob("*") if p.is_file()] if storage.exists() else []


# --- prefect.yaml, without a server -------------------------------------------------------


def test_prefect_yaml_describes_the_four_deployments() -> None:
    specs = {spec.name: spec for spec in read_deployment_specs(PREFECT_YAML)}

    assert list(specs) == DEPLOYMENTS
    (nightly,) = specs["nightly-ingest"].schedules
    assert (nightly.cron, nightly.timezone, nightly.active) == ("0 2 * * *", "UTC", True)
    assert all(not specs[name].schedules for name in DEPLOYMENTS[1:])
    assert all(specs[name].concurrency_limit == 1 for name in DEPLOYMENTS)
    (berlin,) = with_schedule(list(specs.values()), cron=None, timezone="Europe/Berlin")[0].schedules
    assert (berlin.cron, berlin.timezone) == ("0 2 * * *", "Europe/Berlin")


@pytest.mark.parametrize(
    ("name", "flow_name"),
    [
        ("nightly-ingest", "ingest"),
        ("bulk-load", "bulk-load"),
        ("backfill-model", "backfill"),
        ("evaluate", "evaluate"),
    ],
)
def test_each_entrypoint_is_the_expected_flow(name: str, flow_name: str) -> None:
    """Every parameter carries a description: the UI shows it under the field."""
    (spec,) = [spec for spec in read_deployment_specs(PREFECT_YAML) if spec.name == name]
    served = served_deployment(spec)
    module, function = spec.module_and_function
    form = getattr(importlib.import_module(module), function).parameters

    assert served.flow_name == flow_name
    assert served.concurrency_limit == 1
    assert [field for field, schema in form.properties.items() if not schema.get("description")] == []


def test_bulk_load_cannot_choose_its_index_strategy() -> None:
    from flows.ingest import bulk_load, ingest

    assert "index_strategy" in ingest.parameters.properties
    assert "index_strategy" not in bulk_load.parameters.properties


def test_run_settings_map_parameters_and_refuse_secrets_and_unknown_keys(tmp_path: Path) -> None:
    settings = run_settings(
        None,
        {"embed_concurrency": 2},
        include=["docs/**/*.md"],
        provider="hash",
        model="m",
        dimensions=8,
        batch_size=16,
        chunker=None,
        index_strategy="drop",
    )
    assert settings.include == ("docs/**/*.md",)
    assert settings.model_key == "hash:m:8"
    assert settings.embed_batch_inputs == 16 and settings.embed_concurrency == 2
    assert settings.index_strategy == "drop"
    assert settings.chunker == "headings"

    with pytest.raises(ParameterError, match="openai_api_key is a secret"):
        checked_overrides({"openai_api_key": API_KEY})
    with pytest.raises(ParameterError, match="'embed_batch' is not a setting"):
        checked_overrides({"embed_batch": 3})
    with pytest.raises(ParameterError, match="parameter 'source'"):
        existing_folder(str(tmp_path / "missing"))


# --- stage retries, classified by SQLSTATE --------------------------------------------------


def raise_sqlstate(conn: Connection, sqlstate: str) -> None:
    """Make the server raise a real error with this SQLSTATE."""
    conn.execute(
        sql.SQL("DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = {}; END $$").format(
            sql.Literal(sqlstate)
        )
    )


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),
        ("40P01", True),
        ("08006", True),
        ("57P01", True),
        ("23505", False),
        ("57014", False),
        ("22P02", False),
    ],
)
def test_database_errors_are_classified_by_sqlstate(conn: Connection, sqlstate: str, transient: bool) -> None:
    with pytest.raises(psycopg.Error) as caught:
        raise_sqlstate(conn, sqlstate)
    assert caught.value.sqlstate == sqlstate
    assert is_transient_database_error(caught.value) is transient


def test_a_lost_connection_is_transient_and_other_errors_are_not(database_url: str) -> None:
    victim = connect(database_url)
    with connect(database_url) as killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError) as caught:
        victim.execute("SELECT 1")
    victim.close()
    assert is_transient_database_error(caught.value)
    assert not is_transient_database_error(ValueError("not a database error"))


@pytest.mark.prefect
def test_a_stage_retries_a_deadlock_but_not_a_unique_violation(
    prefect_server: PrefectServer, database_url: str
) -> None:
    from prefect import flow

    from tasks.stage import run_as_task, stage_task

    attempts: dict[str, int] = {"40P01": 0, "23505": 0}

    def fail_once(url: str, sqlstate: str) -> str:
        attempts[sqlstate] += 1
        if attempts[sqlstate] == 1 or sqlstate == "23505":
            with connect(url) as conn:
                raise_sqlstate(conn, sqlstate)
        return "done"

    stage = stage_task("fail-once", fail_once)

    @flow(persist_result=False)
    def retrying(sqlstate: str) -> str:
        return run_as_task(stage, database_url, sqlstate)

    with api(prefect_server):
        assert retrying("40P01") == "done"
        with pytest.raises(psycopg.errors.UniqueViolation):
            retrying("23505")
    assert attempts == {"40P01": 2, "23505": 1}


# --- embedding calls under Prefect global concurrency and rate limits ----------------------


class InFlightEmbedder(HashEmbedder):
    """Counts the requests in flight at once; each one yields to the loop while it runs."""

    max_concurrency = 4

    def __init__(self) -> None:
        super().__init__("test", 8)
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.in_flight += 1
        self.requests += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # the request's latency, so batches overlap without a limit
            return await super().embed(texts)
        finally:
            self.in_flight -= 1


def embed_eight_batches(
    *, concurrency_limit: str | None = None, rate_limit: str | None = None
) -> InFlightEmbedder:
    embedder = InFlightEmbedder()
    items = [EmbedItem(bytes([i]), f"text {i}", 2) for i in range(8)]
    policy = EmbedPolicy(
        batch_inputs=1,
        batch_tokens=1000,
        concurrency=4,
        max_attempts=1,
        max_backoff=0.1,
        concurrency_limit=concurrency_limit,
        rate_limit=rate_limit,
    )
    stored: list[Vectors] = []
    asyncio.run(embed_items(embedder, items, policy, lambda hashes, vectors: stored.append(vectors)))
    assert sum(len(v) for v in stored) == 8 and np.isfinite(np.concatenate(stored)).all()
    return embedder


@pytest.mark.prefect
def test_embedding_requests_hold_the_named_global_concurrency_limit(prefect_server: PrefectServer) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"embed-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=1)
    call(prefect_server, lambda c: c.create_global_concurrency_limit(create))
    with api(prefect_server):
        unlimited = embed_eight_batches()
        limited = embed_eight_batches(concurrency_limit=name)

    assert unlimited.most_in_flight > 1
    assert limited.most_in_flight == 1 and limited.requests == 8


@pytest.mark.prefect
def test_embedding_requests_take_a_slot_of_the_named_rate_limit(prefect_server: PrefectServer) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"embed-rate-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=100, slot_decay_per_second=0.001)
    call(prefect_server, lambda c: c.create_global_concurrency_limit(create))
    with api(prefect_server):
        embed_eight_batches(rate_limit=name)
        with pytest.raises(Exception, match="must be created before acquiring slots"):
            embed_eight_batches(rate_limit=f"{name}-missing")

    limit = call(prefect_server, lambda c: c.read_global_concurrency_limit_by_name(name))
    assert limit.active_slots == 8


# --- the deployments end to end -----------------------------------------------------------


@pytest.mark.prefect
def test_deploy_all_creates_the_deployments_with_schedule_limits_and_a_typed_form(
    deployed: PrefectServer,
) -> None:
    nightly = deployment(deployed, "ingest/nightly-ingest")
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.parameters == {"source": "samples/knowledge"}
    assert nightly.work_pool_name == "ragingest"
    names = ["ingest/nightly-ingest", "bulk-load/bulk-load", "backfill/backfill-model", "evaluate/evaluate"]
    for name in names:
        found = deployment(deployed, name)
        assert found.global_concurrency_limit.limit == 1, name
        assert found.enforce_parameter_schema, name

    form = deployment(deployed, "bulk-load/bulk-load").parameter_openapi_schema
    assert form["required"] == ["source"]
    assert "index_strategy" not in form["properties"]
    dimensions = form["properties"]["dimensions"]
    assert dimensions["description"].startswith("Vector dimensions")
    bounds = [{k: option.get(k) for k in ("type", "minimum", "maximum")} for option in dimensions["anyOf"]]
    assert {"type": "integer", "minimum": 1, "maximum": 16000} in bounds


@pytest.mark.prefect
@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"source": "kb", "dimensions": 0}, "'dimensions'"),
        ({"source": "kb", "chunker": "words"}, "'chunker'"),
        ({"source": "kb", "batch_size": "many"}, "'batch_size'"),
        ({"dimensions": 64}, "'source'"),
    ],
)
def test_an_invalid_parameter_is_refused_before_a_run_exists(
    deployed: PrefectServer, parameters: dict[str, Any], named: str
) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    target = deployment(deployed, "bulk-load/bulk-load")
    only_bulk = DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
    before = call(deployed, lambda c: c.count_flow_runs(deployment_filter=only_bulk))

    with pytest.raises(httpx.HTTPStatusError) as refused:
        start_run(deployed, "bulk-load/bulk-load", parameters)

    assert refused.value.response.status_code == 409
    assert named in refused.value.response.text and "Validation failed" in refused.value.response.text
    assert call(deployed, lambda c: c.count_flow_runs(deployment_filter=only_bulk)) == before


@pytest.mark.prefect
def test_bulk_load_run_by_a_worker_loads_rows_publishes_the_summary_and_persists_nothing(
    deployed: PrefectServer, database_url: str, conn: Connection, tmp_path: Path
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    flow_run_id = start_run(deployed, "bulk-load/bulk-load", hash_parameters(kb))
    log = tmp_path / "worker.log"
    env = deployed.env(DATABASE_URL=database_url, OPENAI_API_KEY=API_KEY)
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "ragingest", "--run-once"]
    with background(command, env, log) as worker:
        try:
            worker.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {RUN_SECONDS:.0f} s:\n{tail(log)}")

    run = call(deployed, lambda client: client.read_flow_run(flow_run_id))
    assert run.state.is_completed(), f"{run.state}\n{tail(log)}"

    documents = conn.execute("SELECT count(*) FROM documents").fetchone()
    chunks = conn.execute("SELECT count(*), count(emb_test_64) FROM chunks").fetchone()
    assert documents == (4,)
    assert chunks is not None and chunks[0] > 0 and chunks[1] == chunks[0]

    artifacts = run_artifacts(deployed, flow_run_id)
    assert {"ingest-summary", "ingest-failures", "ingest-progress"} <= set(artifacts)
    summary = table_values(artifacts["ingest-summary"])
    assert summary["documents.new"] == 4 and summary["documents.excluded"] == 1
    assert summary["chunks.written"] == summary["chunks.total"] == chunks[0]
    assert summary["index.strategy"] == "drop"

    messages = run_logs(deployed, flow_run_id)
    assert any("Finished in state Completed" in message for message in messages)
    assert not [m for m in messages if API_KEY in m]
    assert API_KEY not in log.read_text(errors="replace")
    assert storage_files(deployed.client_home) == []


@pytest.mark.prefect
def test_ragingest_serve_runs_a_bulk_load_triggered_through_the_api(
    deployed: PrefectServer, database_url: str, conn: Connection, tmp_path: Path
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    log = tmp_path / "serve.log"
    env = deployed.env(DATABASE_URL=database_url, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with background([str(BIN / "ragingest"), "serve", "--only", "bulk-load"], env, log) as serve:
        flow_run_id = start_run(deployed, "bulk-load/bulk-load", hash_parameters(kb))
        run = wait_for_final_state(deployed, flow_run_id, serve, log)

    assert run.state.is_completed(), f"{run.state}\n{tail(log)}"
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (4,)
    assert "ingest-summary" in run_artifacts(deployed, flow_run_id)
    assert storage_files(deployed.client_home) == []
