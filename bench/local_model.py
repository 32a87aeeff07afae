"""The local model in fp32 and in bf16, each inside the pipeline and as a bare `model.encode`.

Pages of a real corpus (rust-book: chunks of many lengths) are taken until
`--chunks` chunks. For each precision one loaded all-MiniLM-L6-v2 serves:

- bare: `model.encode(texts, batch_size=B, normalize_embeddings=True)` on the
  embed texts the pipeline makes of those pages (title, headings, body), all at
  once; for bf16 inside `torch.autocast(device, dtype=torch.bfloat16)`.
- pipeline: `run_ingest` end to end on those pages into a fresh, migrated
  database (walk, chunk, cache lookups, embed, cache writes, load, index,
  vacuum), with the provider's own batching (256 texts a call, one
  tokenization per call). The pages are chunked as the pipeline does, so both
  variants embed the same texts.

Throughput is chunks per second; medians of repeats, side by side. The closing
line gives bf16 over fp32, the pipeline over a bare encode at the same
precision, and the smallest cosine between the bf16 and fp32 vectors.

    python bench/local_model.py                  # 300 chunks, 3 repeats
    python bench/local_model.py --chunks 1000 --batch-size 32
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
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

from config.settings import LocalPrecision, Settings
from flows.ingest import run_ingest
from tasks.discover import read_document, walk_source
from tasks.embed import SentenceTransformerEmbedder
from tasks.prepare import chunk_spec
from tasks.records import FoundFile

MODEL = "all-MiniLM-L6-v2"
PRECISIONS: tuple[LocalPrecision, ...] = ("fp32", "bf16")


def pick_pages(
    corpus: Path, chunks: int, embedder: SentenceTransformerEmbedder, work: Path
) -> tuple[Path, list[str]]:
    """Copy pages into `work` until they hold `chunks` chunks; return the folder and their embed texts.

    The pages are chunked as the pipeline chunks them (its spec, counted in the
    model's own tokens), so the bare encode and the pipeline embed the same texts.
    """
    root = work / "pages"
    spec = chunk_spec(settings_for(""), [embedder])
    texts: list[str] = []
    for found in walk_source(corpus):
        if not isinstance(found, FoundFile):
            continue
        doc = read_document(found)
        if not doc.include:
            continue
        pieces = spec.chunk(doc, embedder.count_tokens)
        target = root / found.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found.abs_path, target)
        texts += [piece.embed_text for piece in pieces]
        if len(texts) >= chunks:
            break
    return root, texts


def settings_for(url: str) -> Settings:
    return bench_settings(url, 384, embedding_provider="sentence-transformers", embedding_model=MODEL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=SentenceTransformerEmbedder.default_batch_size,
        help="forward batch of the provider and the bare call (default: the provider's)",
    )
    parser.add_argument("--corpus", type=Path, default=CORPORA / "rust-book")
    args = parser.parse_args()
    import torch

    embedders: dict[str, SentenceTransformerEmbedder] = {
        precision: SentenceTransformerEmbedder(MODEL, 384, batch_size=args.batch_size, precision=precision)
        for precision in PRECISIONS
    }
    work = Path(tempfile.mkdtemp(prefix="ragingest-bench-model-"))
    root, texts = pick_pages(args.corpus, args.chunks, embedders["fp32"], work)
    admin = server_url()
    note(
        f"{len(texts)} chunks of {args.corpus.name}; torch threads {torch.get_num_threads()},"
        f" capability {torch.backends.cpu.get_cpu_capability()}, forward batch {args.batch_size},"
        f" max_seq_length {embedders['fp32'].max_input_tokens}"
    )
    vectors = {p: e.encode(texts) for p, e in embedders.items()}  # loads and warms both, untimed
    min_cosine = float(np.min(np.sum(vectors["fp32"] * vectors["bf16"], axis=1)))
    samples = {f"{kind} {p}": Samples(f"{kind} {p}") for kind in ("bare", "pipeline") for p in PRECISIONS}
    written: list[int] = []

    def pipeline(precision: str) -> float:
        url = create_database(admin, "bench_model")  # a migrated database, as a nightly run finds
        embedder = embedders[precision]
        started = time.perf_counter()
        summary = run_ingest(settings_for(url), root, embedder_factory=lambda model, s: embedder)
        seconds = time.perf_counter() - started
        drop_database(admin, "bench_model")
        written.append(summary["embeddings"]["embedded"])
        return seconds

    def bare(precision: str) -> float:
        model = embedders[precision].model
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        started = time.perf_counter()
        with autocast:
            model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return time.perf_counter() - started

    try:
        for turn in range(args.repeats):
            for name in rotated(list(samples), turn):
                kind, precision = name.split()
                samples[name].seconds.append((bare if kind == "bare" else pipeline)(precision))
                note(f"   {name}: {samples[name].seconds[-1]:.2f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(samples, len(texts), written[-1], min_cosine)


def report(samples: dict[str, Samples], texts: int, written: int, min_cosine: float) -> None:
    def rate(name: str) -> float:
        return (written if name.startswith("pipeline") else texts) / samples[name].median

    rows = [
        (name, s.median, rate(name), rate(name) / rate("bare fp32"), s.spread())
        for name, s in samples.items()
    ]
    print_table(["variant", "median s", "chunks/s", "x bare fp32", "range s"], rows)
    print_ratios(
        {
            "bf16_vs_fp32_pipeline": rate("pipeline bf16") / rate("pipeline fp32"),
            "bf16_vs_fp32_bare": rate("bare bf16") / rate("bare fp32"),
            "pipeline_vs_bare_fp32": rate("pipeline fp32") / rate("bare fp32"),
            "pipeline_vs_bare_bf16": rate("pipeline bf16") / rate("bare bf16"),
            "min_cosine_bf16_fp32": f"{min_cosine:.6f}",
        }
    )


if __name__ == "__main__":
    main()
