"""A real Dask cluster for tests: `dask scheduler` and two `dask worker --nthreads 1` processes.

The scheduler listens on 127.0.0.1 on a free port with no dashboard; the workers
run from the checkout (cwd and PYTHONPATH), so they import the project like a
worker host with the project installed. The fixture waits until both workers
are registered (asking the scheduler, no sleeps), and stops every process by
pid afterwards, failing if one is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"
READY_SECONDS = 120.0
STOP_SECONDS = 20.0


@dataclass
class DaskCluster:
    """A running scheduler and its workers; `processes` maps a role to its Popen."""

    address: str
    log_dir: Path
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.scheduler.pid, *(w.pid for w in self.workers)]

    def kill_worker(self, index: int = 0) -> int:
        """SIGKILL one worker (no nanny restarts it); returns its pid."""
        worker = self.workers[index]
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=STOP_SECONDS)
        return worker.pid

    def kill_all(self) -> None:
        """SIGKILL the scheduler and every worker: the cluster is lost at once."""
        for process in [self.scheduler, *self.workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in [self.scheduler, *self.workers]:
            process.wait(timeout=STOP_SECONDS)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=CHECKOUT, env=_environment(), stdout=out, stderr=subprocess.STDOUT
        )


def start_cluster(log_dir: Path, workers: int = 2) -> DaskCluster:
    """Start the scheduler and `workers` workers and wait until the scheduler lists them all."""
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    scheduler = _start(
        [
            str(DASK),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--no-dashboard",
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        log_dir / "scheduler.log",
    )
    cluster = DaskCluster(address, log_dir, scheduler)
    for i in range(workers):
        command = [str(DASK), "worker", address, "--nthreads", "1", "--no-dashboard", "--no-nanny"]
        command += ["--name", f"worker-{i}", "--host", "127.0.0.1"]
        cluster.workers.append(_start(command, log_dir / f"worker-{i}.log"))
    try:
        wait_for_workers(cluster, workers)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def wait_for_workers(cluster: DaskCluster, count: int) -> None:
    """Ask the scheduler until `count` workers are registered (the client retries its connect)."""
    from distributed import Client

    with Client(cluster.address, timeout=f"{READY_SECONDS:.0f}s") as client:  # type: ignore[no-untyped-call]
        client.wait_for_workers(count, timeout=READY_SECONDS)


def stop_cluster(cluster: DaskCluster) -> list[int]:
    """SIGTERM every process, SIGKILL what is left after a grace; returns the pids still alive."""
    processes = [*cluster.workers, cluster.scheduler]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)
    return [pid for pid in cluster.pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A scheduler and two one-thread workers on 127.0.0.1; every process is gone afterwards."""
    cluster = start_cluster(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster
    finally:
        left = stop_cluster(cluster)
        assert left == [], f"Dask processes still running: {left}"
