"""Fixture plugin: a real `prefect server start` on a free port, the deployments of prefect.yaml on
it, and the client calls the tests make against it. Registered in tests/conftest.py.

The server runs with a PREFECT_HOME of its own; every client command (deploy, worker,
serve) gets the environment `PrefectServer.env` builds, so nothing reaches the machine's
Prefect profile.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
READY_SECONDS = 120.0
COMMAND_SECONDS = 180.0
RUN_SECONDS = 240.0


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    client_home: Path
    """PREFECT_HOME of every client command (deploy, worker, serve), apart from the server's."""
    log: Path
    """The server's own output."""

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

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
    """`prefect server start`, on a free port set through PREFECT_SERVER_API_HOST/PORT (so the UI
    calls the right one), for the tests of one module."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    server = PrefectServer(f"http://127.0.0.1:{port}/api", root / "client-home", root / "server.log")
    env = server.env(
        PREFECT_HOME=str(root / "server-home"),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
    )
    del env["PREFECT_API_URL"]
    with background([str(BIN / "prefect"), "server", "start"], env, server.log) as process:
        wait_until_healthy(server.api_url, process, server.log)
        try:
            yield server
        finally:
            drain_client_services()


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    """Prefect's temporary in-process server, for tests that call a flow directly."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=READY_SECONDS):
        yield


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


# --- client calls against the test server -----------------------------------------------------


@contextmanager
def api(server: PrefectServer) -> Iterator[None]:
    """Point this process's Prefect client at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def call(server: PrefectServer, action: Any) -> Any:
    """Run `action(client)` against the test server, on a thread of its own: the caller may
    already run an event loop (playwright's sync API does)."""
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await action(client)

    with api(server), ThreadPoolExecutor(1) as thread:
        return thread.submit(contextvars.copy_context().run, asyncio.run, run()).result()


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


def everything_stored(server: PrefectServer) -> str:
    """What the server keeps that a person can read: every flow run's parameters, name and state
    message, every log line, every deployment's default parameters, and the server's own output."""
    import json

    async def read_all(client: Any) -> tuple[list[Any], list[Any], list[Any]]:
        runs: list[Any] = []
        logs: list[Any] = []
        while page := await client.read_flow_runs(limit=200, offset=len(runs)):
            runs += page
        while page := await client.read_logs(limit=200, offset=len(logs)):
            logs += page
        return runs, logs, await client.read_deployments()

    runs, logs, deployments = call(server, read_all)
    parts = [json.dumps(run.parameters, default=str) for run in runs]
    parts += [f"{run.name} {run.state.message if run.state else ''}" for run in runs]
    parts += [log.message for log in logs]
    parts += [json.dumps(d.parameters, default=str) for d in deployments]
    parts.append(tail(server.log, 10_000_000))
    return "\n".join(parts)
