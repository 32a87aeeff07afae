"""A backfill split into id ranges: each range is filled on its own, in any order or side by side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flows.backfill import register_for_backfill
from flows.ingest import run_ingest
from tasks.backfill import BackfillStats, IdRange, contiguous_ranges, fill_range, plan_id_ranges
from tasks.db import Connection, connect
from tasks.embed import HashEmbedder
from tasks.registry import EmbeddingModel
from tests.conftest import make_settings
from tests.embedders import CountingEmbedder
from tests.test_ingest import write_tree

PAGE_COUNT = 40


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Any:
    pages: dict[str, str | bytes] = {
        f"p{i:03}.md": f"# Page {i}\n\nThe body of page number {i}.\n" for i in range(PAGE_COUNT)
    }
    settings = make_settings(database_url, embed_batch_inputs=3)
    run_ingest(settings, write_tree(tmp_path / "kb", pages))
    return settings


@pytest.fixture
def model(settings: Any, conn: Connection) -> EmbeddingModel:
    return register_for_backfill(conn, settings, "hash", "test", 128, None)


def null_ids(conn: Connection) -> list[int]:
    return [
        int(row[0]) for row in conn.execute("SELECT id FROM chunks WHERE emb_test_128 IS NULL ORDER BY id")
    ]


def test_contiguous_ranges_leave_no_gap_between_parts() -> None:
    assert contiguous_ranges([(3, 9, 4), (12, 20, 4), (21, 21, 1)]) == [
        IdRange(3, 12, 4),
        IdRange(12, 21, 4),
        IdRange(21, 22, 1),
    ]
    assert contiguous_ranges([]) == []


def test_ranges_cover_every_null_row_once_in_near_equal_parts(
    conn: Connection, model: EmbeddingModel
) -> None:
    conn.execute(
        "UPDATE chunks SET emb_test_128 = array_fill(0.5::real, ARRAY[128])::vector WHERE id % 5 = 0"
    )
    ids = null_ids(conn)
    ranges = plan_id_ranges(conn, model, 4)

    assert len(ranges) == 4 and ranges[0].lo == ids[0] and ranges[-1].hi == ids[-1] + 1
    assert all(a.hi == b.lo for a, b in zip(ranges, ranges[1:], strict=False))
    assert [r.rows for r in ranges] == [len([i for i in ids if r.lo <= i < r.hi]) for r in ranges]
    assert (
        sum(r.rows for r in ranges) == len(ids)
        and max(r.rows for r in ranges) - min(r.rows for r in ranges) <= 1
    )


def test_more_ranges_than_rows_gives_one_range_per_row_and_none_when_complete(
    conn: Connection, model: EmbeddingModel
) -> None:
    assert len(plan_id_ranges(conn, model, PAGE_COUNT * 3)) == len(null_ids(conn))
    conn.execute("UPDATE chunks SET emb_test_128 = array_fill(0.5::real, ARRAY[128])::vector")
    assert plan_id_ranges(conn, model, 4) == []
    with pytest.raises(ValueError, match="0 ranges"):
        plan_id_ranges(conn, model, 0)


def test_ranges_filled_side_by_side_complete_the_column_and_embed_each_text_once(
    settings: Any, conn: Connection, model: EmbeddingModel, database_url: str
) -> None:
    ranges = plan_id_ranges(conn, model, 3)
    embedder = CountingEmbedder(HashEmbedder("test", 128))

    def fill(part: IdRange) -> BackfillStats:
        with connect(database_url) as own, connect(database_url) as cache:
            return fill_range(own, cache, model, embedder, settings, part.lo, part.hi, batch_size=4)

    with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        results = list(pool.map(fill, reversed(ranges)))

    assert [s.rows_filled for s in results] == [r.rows for r in reversed(ranges)]
    assert [s.rows_missing_at_start for s in results] == [r.rows for r in reversed(ranges)]
    assert null_ids(conn) == []
    texts = conn.execute("SELECT count(DISTINCT embed_hash) FROM chunks").fetchone()
    assert texts is not None and embedder.embedded == texts[0] and max(embedder.texts.values()) == 1


def test_a_range_fills_only_its_own_rows(settings: Any, conn: Connection, model: EmbeddingModel) -> None:
    first, second = plan_id_ranges(conn, model, 2)
    with connect(settings.database_url.get_secret_value()) as cache:
        stats = fill_range(
            conn, cache, model, HashEmbedder("test", 128), settings, second.lo, second.hi, batch_size=7
        )

    assert stats.rows_filled == second.rows and stats.batches == -(-second.rows // 7)
    assert all(first.lo <= i < first.hi for i in null_ids(conn)) and len(null_ids(conn)) == first.rows


def test_a_dry_run_counts_the_chunks_a_smaller_model_would_cut(database_url: str, tmp_path: Path) -> None:
    """A backfill to a model with a smaller input limit says, before spending, how many chunks it cuts."""
    from flows.backfill import run_backfill
    from tasks.providers.hash import HashEmbedder

    class SmallInput(HashEmbedder):
        max_input_tokens = 40

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "long.md").write_text("# Long\n\n" + "word " * 300 + "\n", encoding="utf-8")
    (kb / "short.md").write_text("# Short\n\nA few words.\n", encoding="utf-8")
    settings = make_settings(database_url)
    ingest_summary = run_ingest(settings, kb)
    assert ingest_summary["chunks"]["total"] >= 2
    summary = run_backfill(
        settings,
        provider="hash",
        model="small",
        dimensions=32,
        dry_run=True,
        embedder=SmallInput("small", 32),
    )
    assert summary["dry_run"] and summary["embeddings"]["truncated"] == 1
