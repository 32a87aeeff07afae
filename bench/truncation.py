"""How many chunks the default local model would cut: chunk every page of a corpus as an
ingest does with all-MiniLM-L6-v2 live, then count embed texts over the model's input limit
in its own tokens. Only runs the chunker never split (a single word or line longer than the
cap) may be over; they are counted apart, as the summary's `oversize` names them.

    cd bench && python truncation.py ../tests/corpora/rust-book/src ../../shared/corpora/prefect-docs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from config.settings import load_settings
from tasks.chunk import chunk_document
from tasks.discover import DocumentError, read_document, walk_source
from tasks.prepare import chunk_spec
from tasks.providers.local import SentenceTransformerEmbedder
from tasks.records import FoundFile


def measure(root: Path) -> tuple[int, int, int, float]:
    """(chunks, over the limit and not marked, marked unsplittable, seconds)."""
    settings = load_settings()
    model = SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)
    spec = chunk_spec(settings, [model])
    started, chunks_seen, over, oversize = time.perf_counter(), 0, 0, 0
    walk = walk_source(
        root, include=settings.include, exclude=settings.exclude, max_bytes=settings.max_file_bytes
    )
    for found in walk:
        if not isinstance(found, FoundFile):
            continue
        try:
            doc = read_document(found, max_bytes=settings.max_file_bytes)
        except DocumentError:
            continue
        chunks = chunk_document(
            doc, chunker=spec.chunker, max_tokens=spec.max_tokens, token_counter=model.count_tokens
        )
        counts = model.count_tokens([c.embed_text for c in chunks]) if chunks else []
        chunks_seen += len(chunks)
        over += sum(
            1 for c, n in zip(chunks, counts, strict=True) if n > model.max_input_tokens and not c.oversize
        )
        oversize += sum(1 for c in chunks if c.oversize)
    return chunks_seen, over, oversize, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path)
    totals = [0, 0, 0]
    for root in parser.parse_args().roots:
        chunks, over, oversize, seconds = measure(root)
        print(f"{root}: {chunks} chunks, {over} over the limit, {oversize} unsplittable ({seconds:.1f} s)")
        totals = [totals[0] + chunks, totals[1] + over, totals[2] + oversize]
    print(
        f"RATIOS truncated_vs_chunks={totals[1]}/{totals[0]} unsplittable_vs_chunks={totals[2]}/{totals[0]}"
    )


if __name__ == "__main__":
    main()
