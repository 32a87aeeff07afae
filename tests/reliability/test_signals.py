"""SIGTERM cleans up as Ctrl-C does: no temporary Prefect server, no embedded Postgres and no
stuck backend is left behind, checked by pid.

Each test starts the real `ragingest` command as a subprocess, waits (by polling state, never
by sleeping) until the run is in progress, sends SIGTERM, and then looks for every process of
that run by pid. Runs are held in progress by the loopback embeddings API, which holds its
answers, or by a lock the test holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from cli.main import EXIT_TERMINATED
from tests.fake_openai import FakeEmbeddingsServer
from tests.reliability.report import CaseFigures
from tests.test_ingest import PAGES, write_tree

SCENARIO = "SIGTERM mid-run"

RAGINGEST = str(Path(sys.executable).parent / "ragingest")
START_SECONDS = 240.0  # a first temporary Prefect server on a fresh PREFECT_HOME takes ~25 s here
EXIT_SECONDS = 120.0


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for the module's runs: only the first pays for the server's database."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def fake_api() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(dimensions=64) as server:
        server.latency = 600.0  # every request is held: the run stays in progress until signalled
        yield server


def run_env(home: Path, prefect_home: Path, api: FakeEmbeddingsServer | None = None) -> dict[str, str]:
    """The embedded database under `home`, the hash model, and the loopback API for openai."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PREFECT_API_URL")}
    env.update(
        RAGINGEST_HOME=str(home),
        PREFECT_HOME=str(prefect_home),
        PREFECT_LOGGING_TO_API_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        EMBEDDING_PROVIDER="hash",
        EMBEDDING_MODEL="test",
        EMBEDDING_DIMENSIONS="64",
        RAGINGEST_EMBED_TIMEOUT_SECONDS="600",
    )
    if api is not None:
        env.update(OPENAI_API_KEY="sk-test-signals", OPENAI_BASE_URL=api.base_url)
    return env


def start(argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """The command in a session of its own, so a failed test can still find what it started."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [RAGINGEST, *argv],
        env=env,
        stdout=(logs / "stdout").open("wb"),
        stderr=(logs / "stderr").open("wb"),
        start_new_session=True,
    )


def output(logs: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (logs / "stdout", logs / "stderr") if p.exists())


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], logs: Path, what: str
) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"ragingest exited with {process.returncode} before {what}:\n{output(logs)[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {START_SECONDS:.0f} s:\n{output(logs)[-4000:]}")
        time.sleep(0.05)  # polling interval; the condition is what synchronises


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def has_prefect_server(pid: int) -> bool:
    return any("uvicorn" in " ".join(p.cmdline()) for p in process_tree(pid)[1:])


def postmaster(home: Path) -> psutil.Process:
    pid = int((home / "pgdata" / "postmaster.pid").read_text().splitlines()[0])
    return psutil.Process(pid)


def handles(home: Path) -> list[int]:
    path = home / "pgdata" / ".handle_pids.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def alive(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those still running after `timeout` (zombies count as gone)."""
    _, left = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def reaper() -> Iterator[list[psutil.Process]]:
    """Processes a test started; whatever is left of them when it ends is killed, by pid."""
    started: list[psutil.Process] = []
    yield started
    for process in alive(started, timeout=0):
        process.kill()


def terminate_and_check(
    process: subprocess.Popen[bytes],
    home: Path,
    logs: Path,
    reaper: list[psutil.Process],
    figures: CaseFigures,
    *,
    twice: bool,
) -> None:
    """SIGTERM (twice: again while cleaning up), then nothing of the run may be left."""
    figures.runs += 1
    figures.faults += 2 if twice else 1
    tree = process_tree(process.pid)
    server = postmaster(home)
    reaper += [*tree, server]
    assert process.pid in handles(home)

    os.kill(process.pid, signal.SIGTERM)
    if twice:
        wait_until(lambda: "terminated" in output(logs), process, logs, "cleaning up")
        os.kill(process.pid, signal.SIGTERM)
    code = process.wait(timeout=EXIT_SECONDS)

    left = alive(tree[1:], timeout=30)
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    assert alive([server], timeout=30) == [], "the embedded Postgres is still running"
    assert process.pid not in handles(home)
    assert code == EXIT_TERMINATED, output(logs)[-4000:]


def test_sigterm_twice_during_a_prefect_ingest_leaves_nothing_running(
    tmp_path: Path,
    prefect_home: Path,
    fake_api: FakeEmbeddingsServer,
    reaper: list[psutil.Process],
    figures: CaseFigures,
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    home, logs = tmp_path / "home", tmp_path / "logs"
    env = run_env(home, prefect_home, fake_api) | {
        "EMBEDDING_PROVIDER": "openai",
        "EMBEDDING_MODEL": "text-embedding-3-small",
    }
    process = start(["ingest", str(kb)], env, logs)
    reaper.append(psutil.Process(process.pid))

    wait_until(lambda: fake_api.in_flight >= 1, process, logs, "embedding")
    assert has_prefect_server(process.pid) and "Beginning flow run" in output(logs)
    terminate_and_check(process, home, logs, reaper, figures, twice=True)


def test_sigterm_during_a_prefect_backfill_leaves_nothing_running(
    tmp_path: Path,
    prefect_home: Path,
    fake_api: FakeEmbeddingsServer,
    reaper: list[psutil.Process],
    figures: CaseFigures,
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    home, logs = tmp_path / "home", tmp_path / "logs"
    env = run_env(home, prefect_home, fake_api)
    loaded = subprocess.run(
        [RAGINGEST, "ingest", str(kb), "--no-prefect"], env=env, capture_output=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr.decode(errors="replace")[-3000:]
    assert handles(home) == []  # that run stopped the server as it left

    argv = ["backfill", "--provider", "openai", "--model", "text-embedding-3-small", "--dimensions", "64"]
    process = start(argv, env, logs)
    reaper.append(psutil.Process(process.pid))

    wait_until(lambda: fake_api.in_flight >= 1, process, logs, "probing the model")
    assert has_prefect_server(process.pid) and "Beginning flow run" in output(logs)
    terminate_and_check(process, home, logs, reaper, figures, twice=False)


def test_sigterm_during_a_migration_rolls_it_back_and_leaves_no_backend(
    database_url: str, tmp_path: Path, prefect_home: Path, reaper: list[psutil.Process], figures: CaseFigures
) -> None:
    figures.runs, figures.faults = 2, 1
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX chunks_token_count")
        conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    logs = tmp_path / "logs"
    env = run_env(tmp_path / "home", prefect_home) | {"DATABASE_URL": database_url}
    with psycopg.connect(database_url, autocommit=True) as holder:
        with holder.transaction():
            holder.execute("LOCK TABLE chunks IN ROW EXCLUSIVE MODE")  # 002's CREATE INDEX waits on it
            process = start(["db", "migrate"], env, logs)
            reaper.append(psutil.Process(process.pid))
            waiting = (
                "SELECT pid FROM pg_locks WHERE relation = 'chunks'::regclass AND NOT granted"
                " AND pid <> pg_backend_pid()"
            )
            wait_until(lambda: holder.execute(waiting).fetchone() is not None, process, logs, "migrating")
            row = holder.execute(waiting).fetchone()
            assert row is not None
            backend = int(row[0])

            os.kill(process.pid, signal.SIGTERM)
            code = process.wait(timeout=EXIT_SECONDS)
            gone = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)"
            deadline = time.monotonic() + 30
            while holder.execute(gone, (backend,)).fetchone() != (True,):
                assert time.monotonic() < deadline, "the migration's backend is still there"
                time.sleep(0.05)
            assert code == EXIT_TERMINATED, output(logs)[-4000:]
        recorded = holder.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert (2,) not in recorded
        assert holder.execute("SELECT to_regclass('chunks_token_count')").fetchone() == (None,)

    again = subprocess.run([RAGINGEST, "db", "migrate"], env=env, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode(errors="replace")[-3000:]
    assert b"applied 1 migration(s): 002_search" in again.stdout


def test_a_dead_pid_left_in_the_handle_list_no_longer_keeps_the_server_running(
    tmp_path: Path, prefect_home: Path
) -> None:
    home = tmp_path / "home"
    env = run_env(home, prefect_home)
    first = subprocess.run([RAGINGEST, "db", "migrate"], env=env, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode(errors="replace")[-3000:]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "pgdata" / ".handle_pids.json").write_text(json.dumps([dead.pid]))  # as a killed run leaves it

    try:
        again = subprocess.run([RAGINGEST, "db", "migrate"], env=env, capture_output=True, timeout=300)
        assert again.returncode == 0, again.stderr.decode(errors="replace")[-3000:]
        assert servers_of(home) == [], "the embedded Postgres is still running"
        assert handles(home) == []
    finally:
        for server in servers_of(home):
            server.terminate()


def servers_of(home: Path) -> list[psutil.Process]:
    """Postgres processes serving the data folder under `home`."""
    pgdata = str((home / "pgdata").resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and pgdata in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return alive(found, timeout=0)
