"""The openai provider against the loopback fake API: texts/s against `concurrency x batch / latency`.

`embed_items` with `OpenAIEmbedder` (the real SDK) embeds unique ~800-character
texts against `tests/fake_openai.py`'s server, which holds every successful
request for a fixed latency. The bound is what the concurrency and batch size
allow at that latency. Run with no faults and with 20% of requests answered 429
(with a Retry-After). Every text must reach `on_batch` exactly once and be
answered by the server exactly once (its `embedded_texts` Counter). The texts/s
include `embed_items`' own work
(token counting, batching, decoding the answers); one untimed warm-up call
first takes the SDK's one-off lazy imports out of the figures.

The server runs in a child process, as a remote API would: in this process its
threads would compete with the client for the GIL and the two cores.

    python bench/embed.py
    python bench/embed.py --latency 0.5 --rounds 10 --concurrency 4 --batch 128 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

from common import Samples, bench_settings, note, print_ratios, print_table, section_text

from tasks.embed import EmbedItem, EmbedPolicy, EmbedStats, OpenAIEmbedder, embed_items
from tasks.records import sha256_text
from tests.fake_openai import FakeEmbeddingsServer

MODEL = "text-embedding-3-small"


class RemoteServer:
    """`FakeEmbeddingsServer` in a child process, driven over a pipe."""

    def __init__(self, dimensions: int, latency: float) -> None:
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end, dimensions, latency), daemon=True)
        self._process.start()
        self.base_url = str(self._pipe.recv())

    def call(self, *command: Any) -> Any:
        self._pipe.send(command)
        return self._pipe.recv()

    def close(self) -> None:
        self.call("stop")
        self._process.join(5)


def _serve(pipe: Pipe, dimensions: int, latency: float) -> None:
    with FakeEmbeddingsServer(dimensions=dimensions, latency=latency) as server:
        pipe.send(server.base_url)
        while True:
            command, *rest = pipe.recv()
            if command == "stop":
                pipe.send(None)
                return
            if command == "reset":
                server.reset_counters()
                server.clear_faults()
                if rest:
                    rate, seed, retry_after = rest
                    server.random_faults(rate, seed=seed, kinds=("rate_limit",), retry_after=retry_after)
                pipe.send(None)
            elif command == "embedded_texts":
                pipe.send(dict(server.embedded_texts))


def make_items(count: int, offset: int) -> list[EmbedItem]:
    texts = [section_text(offset + n, 0) for n in range(count)]
    return [EmbedItem(sha256_text(text), text, len(text) // 4) for text in texts]


def run_once(
    server: RemoteServer, items: Sequence[EmbedItem], args: argparse.Namespace, faults: bool
) -> tuple[float, EmbedStats, Counter[bytes]]:
    settings = bench_settings(
        "",
        args.dims,
        embedding_provider="openai",
        embedding_model=MODEL,
        openai_api_key="sk-bench",
        openai_base_url=server.base_url,
        embed_concurrency=args.concurrency,
        embed_batch_inputs=args.batch,
        embed_max_attempts=20,
        embed_max_backoff_seconds=5.0,
        embed_timeout_seconds=30.0,
    )
    embedder = OpenAIEmbedder(MODEL, args.dims, settings)
    policy = EmbedPolicy.from_settings(settings, embedder)
    delivered: Counter[bytes] = Counter()

    def on_batch(hashes: Sequence[bytes], vectors: object) -> None:
        delivered.update(hashes)

    if faults:
        server.call("reset", 0.2, len(items), args.retry_after)
    else:
        server.call("reset")
    stats = EmbedStats()

    async def embed_all() -> float:
        started = time.perf_counter()
        await embed_items(embedder, items, policy, on_batch, stats=stats)
        seconds = time.perf_counter() - started
        await embedder.aclose()  # the loop's HTTP pool, closed before the loop is
        return seconds

    return asyncio.run(embed_all()), stats, delivered


def check(items: Sequence[EmbedItem], delivered: Counter[bytes], server: RemoteServer) -> tuple[int, int]:
    """(texts lost, texts embedded more than once), by what on_batch got and what the server answered."""
    answered = Counter(server.call("embedded_texts"))
    lost = sum(1 for item in items if delivered[item.embed_hash] == 0 or answered[item.text] == 0)
    twice = sum(1 for item in items if delivered[item.embed_hash] > 1 or answered[item.text] > 1)
    return lost, twice


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server holds a request")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="embed_concurrency (default: the setting's 4)"
    )
    parser.add_argument(
        "--batch", type=int, default=128, help="embed_batch_inputs (default: the setting's 128)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="texts = concurrency x batch x rounds")
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--retry-after", type=float, default=0.1, help="Retry-After of the 429s, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    count = args.concurrency * args.batch * args.rounds
    bound = args.concurrency * args.batch / args.latency
    note(
        f"{count:,} texts of ~800 characters, {args.dims} dims, concurrency {args.concurrency}, "
        f"batch {args.batch}, latency {args.latency}s: bound {bound:,.0f} texts/s. Medians of {args.repeats}."
    )
    samples = {"no faults": Samples("no faults"), "20% 429": Samples("20% 429")}
    problems = {name: [0, 0] for name in samples}
    retries = {name: 0 for name in samples}
    logging.getLogger("tasks.embed").setLevel(logging.ERROR)  # the retries are counted below
    server = RemoteServer(args.dims, args.latency)
    try:
        run_once(server, make_items(args.batch, offset=10**6), args, faults=False)  # SDK warm-up, untimed
        for turn in range(args.repeats):
            for name in samples:
                items = make_items(count, offset=(turn * 2 + (name != "no faults")) * count)
                seconds, stats, delivered = run_once(server, items, args, faults=name != "no faults")
                lost, twice = check(items, delivered, server)
                problems[name][0] += lost
                problems[name][1] += twice
                retries[name] += stats.retries
                samples[name].seconds.append(seconds)
                note(
                    f"   {name}: {count / seconds:,.0f} texts/s, {stats.batches} batches,"
                    f" {stats.retries} retries,"
                    f" lost {lost}, twice {twice}"
                )
    finally:
        server.close()
    # With 20% failures a batch needs 1.25 attempts on average; each failure costs a Retry-After.
    fault_bound = args.concurrency * args.batch / (args.latency + 0.25 * args.retry_after)
    rows = []
    for name, sample in samples.items():
        rate = count / sample.median
        rows.append(
            (name, sample.median, rate, rate / bound, retries[name], problems[name][0], problems[name][1])
        )
    print_table(["case", "median s", "texts/s", "x bound", "retries", "lost", "embedded twice"], rows)
    note(
        f"   with 429s the bound less the Retry-After waits is {fault_bound:,.0f} texts/s: "
        f"x {count / samples['20% 429'].median / fault_bound:.2f} of it"
    )
    print_ratios(
        {
            "no_faults_vs_bound": count / samples["no faults"].median / bound,
            "429s_vs_bound": count / samples["20% 429"].median / bound,
            "lost": sum(p[0] for p in problems.values()),
            "embedded_twice": sum(p[1] for p in problems.values()),
        }
    )


if __name__ == "__main__":
    main()
