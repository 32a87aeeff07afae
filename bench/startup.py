"""What a no-change run costs as a whole process, against a floor that only walks and hashes.

- floor: `python -c` that walks the folder and hashes every file (SHA-256), the
  least any sync must do to know nothing changed.
- plain: `ragingest ingest FOLDER --no-prefect --json` after a first run loaded
  the folder (so every file is unchanged and no text is embedded).
- with `--prefect`: the same run as a Prefect flow, on the temporary server
  Prefect starts by itself, and on a configured server (`prefect server start`,
  PREFECT_API_URL) started here once, before the timing.

Two folders: samples/knowledge, and `--files` small pages with one shared body
(the first run embeds a single text with the default local model). What each
file costs with start-up taken out is bench/nightly.py's figure (in-process);
here a difference of two whole-process times is mostly start-up noise. Every
command runs under `/usr/bin/time`, which gives its wall seconds and peak RSS;
the embedded Postgres lives in a temporary RAGINGEST_HOME (or DATABASE_URL).

    python bench/startup.py
    python bench/startup.py --files 10000 --repeats 5 --prefect
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import REPO, Samples, note, print_ratios, print_table

RAGINGEST = [sys.executable, "-m", "cli.main"]
FLOOR = (
    "import hashlib, os, sys\n"
    "for folder, _, names in os.walk(sys.argv[1]):\n"
    "    for name in names:\n"
    "        with open(os.path.join(folder, name), 'rb') as handle:\n"
    "            hashlib.sha256(handle.read()).digest()\n"
)
PAGE = "# A note\n\nThe same short body in every page, so a first run embeds it once.\n"


def measured(command: Sequence[str], env: Mapping[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one whole process, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(
            ["/usr/bin/time", "-o", report.name, "-f", "%e %M", *command],
            env=dict(env),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        seconds, kib = report.read().split()[-2:]
    return float(seconds), int(kib) / 1024


def write_pages(root: Path, count: int) -> Path:
    for n in range(count):
        path = root / f"d{n // 500:03}" / f"page-{n:05}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PAGE)
    return root


def start_prefect_server(env: dict[str, str], home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`prefect server start` on a free port; returns it and its API URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server_env = {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    server_env["PREFECT_HOME"] = str(home / "prefect-server")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start"],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        probe_run = subprocess.run(
            ["curl", "-sf", f"{url}/health"], capture_output=True, check=False, timeout=10
        )
        if probe_run.returncode == 0:
            return process, url
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("prefect server start did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000, help="pages in the large folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefect", action="store_true", help="also time the run as a Prefect flow")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-startup-"))
    env = {**os.environ, "RAGINGEST_HOME": str(work / "home"), "PREFECT_HOME": str(work / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = str(REPO)
    folders = {"samples": REPO / "samples" / "knowledge", "files": write_pages(work / "pages", args.files)}
    server: subprocess.Popen[bytes] | None = None
    try:
        for folder in folders.values():  # the first load, untimed
            measured([*RAGINGEST, "ingest", str(folder), "--no-prefect", "--json"], env)
        variants: dict[str, tuple[list[str], dict[str, str]]] = {}
        for name, folder in folders.items():
            variants[f"{name}: floor"] = ([sys.executable, "-c", FLOOR, str(folder)], env)
            variants[f"{name}: plain"] = ([*RAGINGEST, "ingest", str(folder), "--no-prefect", "--json"], env)
        if args.prefect:
            flow = [*RAGINGEST, "ingest", str(folders["samples"]), "--json"]
            measured(flow, env)  # the temporary server's first start on a fresh PREFECT_HOME, untimed
            variants["samples: prefect, temporary server"] = (flow, env)
            server, url = start_prefect_server(env, work)
            variants["samples: prefect, configured server"] = (flow, {**env, "PREFECT_API_URL": url})
        results = {name: (Samples(name), Samples(name)) for name in variants}
        for turn in range(args.repeats):
            for name, (command, command_env) in variants.items():
                seconds, mib = measured(command, command_env)
                results[name][0].seconds.append(seconds)
                results[name][1].seconds.append(mib)
                note(f"   {turn}: {name}: {seconds:.2f}s, {mib:.0f} MiB")
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def report(results: Mapping[str, tuple[Samples, Samples]], args: argparse.Namespace) -> None:
    rows = [(name, wall.median, wall.spread(), rss.median) for name, (wall, rss) in results.items()]
    print_table(["command", "median s", "range s", "peak MiB"], rows)

    def wall(name: str) -> float:
        return results[name][0].median

    ratios: dict[str, float | str] = {
        "samples_plain_s": wall("samples: plain"),
        "samples_plain_mib": results["samples: plain"][1].median,
        "samples_plain_vs_floor": wall("samples: plain") / wall("samples: floor"),
        f"files{args.files}_plain_vs_floor": wall("files: plain") / wall("files: floor"),
    }
    for name in ("samples: prefect, temporary server", "samples: prefect, configured server"):
        if name in results:
            key = "prefect_temporary_adds_s" if "temporary" in name else "prefect_server_adds_s"
            ratios[key] = wall(name) - wall("samples: plain")
    print_ratios(ratios)


if __name__ == "__main__":
    main()
