"""The sentence-transformers provider inside the pipeline against a bare `model.encode`.

Pages of a real corpus (rust-book: chunks of many lengths) are taken until
`--chunks` chunks. The same loaded all-MiniLM-L6-v2 model serves:

- bare: `model.encode(texts, batch_size=B, normalize_embeddings=True)` on the
  embed texts the pipeline makes of those pages (title, headings, body), all at once.
- provider: `embed_items` with `SentenceTransformerEmbedder` (the pipeline's
  batching: `embed_batch_inputs` texts per call, the length check of `prepare`,
  a worker thread), no database.
- pipeline: `run_ingest` end to end on those pages into a fresh database
  (walk, chunk, cache lookups, embed, cache writes, load, index, vacuum).

Throughput is chunks per second; medians of repeats, side by side.

    python bench/local_model.py                  # 300 chunks, 3 repeats
    python bench/local_model.py --chunks 1000 --batch-size 64 --batch-inputs 128
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

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
)

from config.settings import Settings
from flows.ingest import run_ingest
from tasks.chunk import chunk_document
from tasks.discover import read_document, walk_source
from tasks.embed import EmbedItem, EmbedPolicy, SentenceTransformerEmbedder, embed_items
from tasks.records import FoundFile

MODEL = "all-MiniLM-L6-v2"


def pick_pages(corpus: Path, chunks: int, cap: int, work: Path) -> tuple[Path, list[str]]:
    """Copy pages into `work` until they hold `chunks` chunks; return the folder and their embed texts."""
    root = work / "pages"
    texts: list[str] = []
    for found in walk_source(corpus):
        if not isinstance(found, FoundFile):
            continue
        doc = read_document(found)
        if not doc.include:
            continue
        pieces = chunk_document(doc, chunker="headings", max_tokens=cap, size=min(400, cap), overlap=50)
        target = root / found.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found.abs_path, target)
        texts += [piece.embed_text for piece in pieces]
        if len(texts) >= chunks:
            break
    return root, texts


def settings_for(url: str, args: argparse.Namespace) -> Settings:
    return bench_settings(
        url,
        384,
        embedding_provider="sentence-transformers",
        embedding_model=MODEL,
        embed_batch_inputs=args.batch_inputs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="encode batch size of the provider and the bare call"
    )
    parser.add_argument(
        "--batch-inputs", type=int, default=128, help="embed_batch_inputs: texts per provider call"
    )
    parser.add_argument("--corpus", type=Path, default=CORPORA / "rust-book")
    args = parser.parse_args()
    import torch

    embedder = SentenceTransformerEmbedder(MODEL, 384, batch_size=args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-model-"))
    root, texts = pick_pages(args.corpus, args.chunks, embedder.max_input_tokens, work)
    admin = server_url()
    note(
        f"{len(texts)} chunks of {args.corpus.name}; torch threads {torch.get_num_threads()},"
        f" encode batch_size {args.batch_size}, embed_batch_inputs {args.batch_inputs},"
        f" max_seq_length {embedder.max_input_tokens}"
    )
    embedder.model.encode(texts[:16], batch_size=args.batch_size)  # warm-up, untimed
    policy = EmbedPolicy.from_settings(settings_for("", args), embedder)
    items = [EmbedItem(bytes(n.to_bytes(8, "big")), text, 0) for n, text in enumerate(texts)]
    samples = {
        name: Samples(name) for name in ("bare encode", "provider (embed_items)", "pipeline (run_ingest)")
    }
    written: list[int] = []

    def bare() -> None:
        embedder.model.encode(
            texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )

    def provider() -> None:
        asyncio.run(embed_items(embedder, items, policy, lambda hashes, vectors: None))

    def pipeline() -> None:
        url = create_database(admin, "bench_model")
        summary = run_ingest(settings_for(url, args), root, embedder_factory=lambda model, s: embedder)
        drop_database(admin, "bench_model")
        written.append(summary["embeddings"]["embedded"])

    variants = {"bare encode": bare, "provider (embed_items)": provider, "pipeline (run_ingest)": pipeline}
    try:
        for turn in range(args.repeats):
            for name in rotated(list(variants), turn):
                started = time.perf_counter()
                variants[name]()
                samples[name].seconds.append(time.perf_counter() - started)
                note(f"   {name}: {samples[name].seconds[-1]:.2f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    count = written[-1]
    bare_rate = len(texts) / samples["bare encode"].median
    rows = []
    for name, sample in samples.items():
        n = len(texts) if name != "pipeline (run_ingest)" else count
        rows.append((name, sample.median, n / sample.median, n / sample.median / bare_rate, sample.spread()))
    print_table(["variant", "median s", "chunks/s", "x bare", "range s"], rows)
    print_ratios(
        {
            "pipeline_vs_bare": count / samples["pipeline (run_ingest)"].median / bare_rate,
            "provider_vs_bare": len(texts) / samples["provider (embed_items)"].median / bare_rate,
        }
    )


if __name__ == "__main__":
    main()
