"""A nightly rerun with nothing changed, against the floor of walking, reading and hashing.

For each corpus, a first `run_ingest` (hash provider) fills the database; then
reruns with nothing changed alternate with the floor: plain Python that walks
the same tree (os.walk, the same suffixes), reads every file and hashes it with
SHA-256. The rerun's embedding calls are counted (the goal is 0).

    python bench/nightly.py                 # prefect-docs + a synthetic 10k-file tree, 5 repeats
    python bench/nightly.py --files 10000 --repeats 7
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    CORPORA,
    Samples,
    bench_settings,
    create_database,
    drop_database,
    note,
    print_ratios,
    print_table,
    rotated,
    server_url,
    write_tree,
)

from flows.ingest import run_ingest
from tests.embedders import CountingFactory

SUFFIXES = (".md", ".mdx", ".markdown")


def walk_read_hash(root: Path) -> int:
    """The floor: every Markdown file under `root` read and hashed, in plain Python."""
    count = 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if name.endswith(SUFFIXES):
                with open(os.path.join(folder, name), "rb") as handle:
                    hashlib.sha256(handle.read()).digest()
                count += 1
    return count


def measure(admin: str, name: str, root: Path, repeats: int) -> dict[str, float]:
    url = create_database(admin, f"bench_nightly_{name}")
    settings = bench_settings(url, 384)
    factory = CountingFactory()
    started = time.perf_counter()
    first = run_ingest(settings, root, embedder_factory=factory)
    note(
        f"\n== {name}: first run {time.perf_counter() - started:.1f}s, "
        f"{first['documents']['new']} documents, {first['chunks']['written']:,} chunks"
    )
    files = walk_read_hash(root)
    factory.reset()
    samples = {"floor": Samples("floor"), "rerun": Samples("rerun")}
    last: dict[str, Any] = {}

    def rerun() -> None:
        nonlocal last
        last = run_ingest(settings, root, embedder_factory=factory)

    for turn in range(repeats):
        for variant, fn in rotated([("floor", lambda: walk_read_hash(root)), ("rerun", rerun)], turn):
            started = time.perf_counter()
            fn()
            samples[variant].seconds.append(time.perf_counter() - started)
    drop_database(admin, f"bench_nightly_{name}")
    calls = sum(e.calls for e in factory.embedders.values())
    assert last["documents"]["unchanged"] == first["documents"]["new"], last["documents"]
    assert last["chunks"]["written"] == 0, last["chunks"]
    floor, ours = samples["floor"].median, samples["rerun"].median
    print_table(
        ["variant", "median s", "files/s", "x floor", "range s"],
        [
            ("floor: walk + read + sha256", floor, files / floor, 1.0, samples["floor"].spread()),
            (
                "ours: run_ingest, nothing changed",
                ours,
                files / ours,
                ours / floor,
                samples["rerun"].spread(),
            ),
        ],
    )
    note(
        f"   {files} files; embedding calls in {repeats} reruns: {calls}, texts embedded: {factory.embedded}"
    )
    note("   last rerun's stages: " + ", ".join(f"{k} {v:.3f}" for k, v in last["seconds"].items()))
    return {f"rerun_vs_floor@{name}": ours / floor, f"embed_calls@{name}": float(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files", type=int, default=10_000, help="files of the synthetic tree (default 10000)"
    )
    parser.add_argument("--sections", type=int, default=3, help="sections (chunks) per synthetic file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--corpus", type=Path, default=CORPORA / "prefect-docs")
    args = parser.parse_args()
    admin = server_url()
    note("x floor = our rerun seconds / floor seconds (lower is better; goal <= 2). Medians of repeats.")
    ratios: dict[str, float] = {}
    if args.corpus.is_dir():
        ratios.update(measure(admin, args.corpus.name, args.corpus, args.repeats))
    else:
        note(f"corpus {args.corpus} not found; skipped")
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-nightly-"))
    try:
        root = write_tree(work / "tree", args.files, args.sections)
        ratios.update(measure(admin, f"synthetic-{args.files // 1000}k", root, args.repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_ratios({k: (int(v) if k.startswith("embed_calls") else v) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
