"""The headings chunker against its implementation before the speed-up, side by side.

The baseline is `tasks/chunk.py` as of commit 7e4ab35 (read with `git show`).
Both chunk every page of each shared corpus (prefect-docs, rust-book; a corpus
that is absent is skipped) with the same cap, in alternating repeats, and
every chunk they give must be equal in every field. The process is pinned to
one CPU and timed in CPU seconds (`time.process_time`), so other work on a
shared machine slows the figures less than it would wall-clock time.

    python bench/chunk.py                  # cap 256 (all-MiniLM-L6-v2's limit), 3 repeats
    python bench/chunk.py --cap 512 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from common import CORPORA, REPO, Samples, note, print_ratios, print_table

from tasks import chunk as current
from tasks.discover import DocumentError, read_document, walk_source
from tasks.records import Chunk, FoundFile, ParsedDocument
from tasks.tokens import token_lengths

BASELINE_COMMIT = "7e4ab35"
CORPUS_NAMES = ("prefect-docs", "rust-book")

Chunker = Callable[..., list[Chunk]]


def baseline_module() -> ModuleType:
    """`tasks/chunk.py` at `BASELINE_COMMIT`, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:tasks/chunk.py"],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    module = ModuleType("baseline_chunk")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BASELINE_COMMIT}:tasks/chunk.py", "exec"), module.__dict__)
    return module


def corpus_pages(folder: Path) -> list[ParsedDocument]:
    pages: list[ParsedDocument] = []
    for found in walk_source(folder):
        if isinstance(found, FoundFile):
            try:
                pages.append(read_document(found))
            except DocumentError as error:
                note(f"   skipped {error}")
    return pages


def chunk_all(
    chunk_document: Chunker, pages: Sequence[ParsedDocument], cap: int
) -> tuple[float, list[list[Chunk]]]:
    started = time.process_time()
    chunks = [chunk_document(page, max_tokens=cap) for page in pages]
    return time.process_time() - started, chunks


def compare(
    name: str, pages: Sequence[ParsedDocument], cap: int, repeats: int, baseline: ModuleType
) -> float:
    """Chunks per second of each implementation on `pages`; the speed-up of the current one."""
    variants: dict[str, Chunker] = {"baseline": baseline.chunk_document, "current": current.chunk_document}
    samples = {label: Samples(label) for label in variants}
    outputs: dict[str, list[list[Chunk]]] = {}
    for turn in range(repeats):
        for label in list(variants)[:: 1 if turn % 2 == 0 else -1]:
            seconds, outputs[label] = chunk_all(variants[label], pages, cap)
            samples[label].seconds.append(seconds)
        if outputs["current"] != outputs["baseline"]:
            raise SystemExit(f"{name}: the current chunker's chunks differ from the baseline's")
    count = sum(len(chunks) for chunks in outputs["current"])
    print_table(
        ["implementation", "pages", "chunks", "CPU s (median)", "chunks/s", "spread"],
        [
            [label, len(pages), count, round(s.median, 3), round(count / s.median), s.spread()]
            for label, s in samples.items()
        ],
    )
    return samples["baseline"].median / samples["current"].median


def warm_up(baseline: ModuleType, pages: Sequence[ParsedDocument], cap: int) -> None:
    """Load the encoding and build the parsers and tables once, outside the timings."""
    for page in pages[:3]:
        baseline.chunk_document(page, max_tokens=cap)
        current.chunk_document(page, max_tokens=cap)
    token_lengths()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cap", type=int, default=256, help="the headings chunker's cap in tokens (default 256)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each implementation (default 3)"
    )
    parser.add_argument("--corpora", type=Path, default=CORPORA, help="folder holding the shared corpora")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    baseline = baseline_module()
    ratios: dict[str, Any] = {}
    for name in CORPUS_NAMES:
        folder = args.corpora / name
        if not folder.is_dir():
            note(f"\n== {name}: not found at {folder}, skipped")
            continue
        pages = corpus_pages(folder)
        note(f"\n== {name}: {len(pages)} pages, cap {args.cap}, {args.repeats} repeats, one CPU")
        warm_up(baseline, pages, args.cap)
        speedup = compare(name, pages, args.cap, args.repeats, baseline)
        ratios[f"chunk_speedup_{name.replace('-', '_')}"] = f"{speedup:.2f}x"
    ratios["identical"] = "yes" if ratios else "no corpus"
    print_ratios(ratios)
    return ratios


if __name__ == "__main__":
    main()
