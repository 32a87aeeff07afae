"""Bad input: generated Markdown, frontmatter and bytes never crash or hang discover and chunk;
real odd files are reported by name and reason while the rest ingest."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from config.settings import ChunkerName
from flows.ingest import run_ingest
from tasks.chunk import chunk_document
from tasks.db import Connection
from tasks.discover import DocumentError, parse_document
from tasks.embed import HashEmbedder, Vectors
from tasks.registry import EmbeddingModel
from tests.conftest import make_settings
from tests.embedders import CountingEmbedder
from tests.reliability.harness import Corpus, check_invariants
from tests.reliability.report import SEED, CaseFigures

SCENARIO = "Bad input"
SOURCE = "kb"
EXAMPLE_SECONDS = 5.0
"""No single generated file may take longer than this to parse and chunk (a hang fails fast)."""
CAP = 64

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


class ExampleHung(Exception):
    """Parsing or chunking one generated file ran past EXAMPLE_SECONDS."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise ExampleHung in this (main) thread if the block runs longer than `seconds`."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise ExampleHung(f"ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_and_chunk(data: bytes, path: str = "fuzz/page.md") -> str:
    """Discover then chunk one file, both chunkers; DocumentError is the only refusal allowed."""
    with time_bound(EXAMPLE_SECONDS):
        try:
            doc = parse_document(path, data)
        except DocumentError as refused:
            assert refused.path == path and refused.reason.strip(), (
                "a refusal must name the file and a reason"
            )
            return "refused"
        chunkers: tuple[ChunkerName, ...] = ("headings", "tokens")
        for chunker in chunkers:
            chunks = chunk_document(doc, chunker=chunker, max_tokens=CAP, size=CAP, overlap=8)
            assert [chunk.ordinal for chunk in chunks] == list(range(len(chunks)))
            assert all(chunk.token_count <= CAP for chunk in chunks), "a chunk is over the token cap"
            assert all("\r" not in chunk.content and "\x00" not in chunk.content for chunk in chunks)
    return "parsed"


# --- generated input ---------------------------------------------------------------

MARKDOWN_PIECES = [
    "# Title",
    "## Section",
    "###### Deep",
    "#NoSpace",
    "Setext",
    "===",
    "---",
    "***",
    "___",
    "```",
    "```python",
    "~~~",
    "~~~~",
    "    indented code",
    "> quote",
    "> > nested",
    "- item",
    "* item",
    "1. item",
    "1) item",
    "| a | b |",
    "|---|---|",
    "<div>",
    "</div>",
    "<!-- comment",
    "-->",
    "<script>",
    "[link](http://x)",
    "![image](x.png)",
    "[ref]: http://x",
    "",
    " ",
    "\t",
    "\\",
    "`inline`",
    "**bold",
    "_under_",
    "$$",
    "\u00a0",
    "\u200b",
    "\ufeff",
    "\u2028",
    "...",
    "# " + "x" * 300,
    "word " * 200,
    "🙂" * 50,
    "a" * 2000,
]
FRONTMATTER_PIECES = [
    "title: A page",
    "title:",
    "title: [unclosed",
    "tags: [a, b",
    "tags: a, b, c",
    "rag_include: false",
    "rag_include: 0",
    "rag_namespace: ../../etc",
    'rag_namespace: "\'; DROP TABLE chunks; --"',
    "a: &x [*x]",
    "b: *undefined",
    "? complex key",
    "key: !!python/object/apply:os.system ['true']",
    "- a list item",
    "{",
    "}",
    "date: 2024-13-45",
    "when: 2024-01-02",
    "n: .nan",
    "i: .inf",
    "bin: !!binary AAAA",
    "<<: *x",
    "big: " + "9" * 5000,
    "nested: " + "[" * 100,
    "\t- tab",
    "%YAML 1.1",
    "--- !tag",
    'key: "\\x00"',
]

markdown_text = st.lists(st.one_of(st.sampled_from(MARKDOWN_PIECES), st.text(max_size=60)), max_size=40).map(
    "\n".join
)
frontmatter_text = st.lists(
    st.one_of(st.sampled_from(FRONTMATTER_PIECES), st.text(max_size=30)), max_size=12
).map("\n".join)


@st.composite
def markdown_files(draw: Any) -> bytes:
    """A page: maybe a BOM, maybe frontmatter, a body, one newline style, maybe a byte flipped."""
    body = draw(markdown_text)
    text = f"---\n{draw(frontmatter_text)}\n---\n{body}" if draw(st.booleans()) else body
    text = text.replace("\n", draw(st.sampled_from(["\n", "\r\n", "\r"])))
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


@seed(SEED)
@FUZZ
@given(data=markdown_files())
@pytest.mark.timeout(300)
def test_generated_markdown_and_frontmatter_parse_and_chunk_or_are_refused_by_name(
    data: bytes, figures: CaseFigures
) -> None:
    figures.bad_inputs += 1
    parse_and_chunk(data)


@seed(SEED)
@FUZZ
@given(data=st.binary(max_size=4000))
@pytest.mark.timeout(300)
def test_random_bytes_parse_and_chunk_or_are_refused_by_name(data: bytes, figures: CaseFigures) -> None:
    figures.bad_inputs += 1
    parse_and_chunk(data)


# --- real odd files, through a whole ingest ------------------------------------------

GONE = "zz/removed-mid-run.md"
EMPTY_PAGES = frozenset({"odd/empty.md", "odd/frontmatter-only.md"})
"""Pages with no text to index: stored without chunks, and listed with the reason as skipped."""


class RemovingEmbedder(CountingEmbedder):
    """Deletes a file the run has listed but not read yet, on the first batch: a file removed mid-run."""

    def __init__(self, victim: Path) -> None:
        super().__init__(HashEmbedder("test", 64))
        self.victim = victim

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if self.victim.exists():
            self.victim.unlink()
        return await super().embed(texts)


def write_odd_files(root: Path) -> dict[str, str]:
    """The odd files, and for each one that must be reported, a word its reason must hold."""
    odd = root / "odd"
    odd.mkdir(parents=True)
    (odd / "empty.md").write_bytes(b"")
    (odd / "frontmatter-only.md").write_text("---\ntitle: Only frontmatter\n---\n")
    (odd / "latin1.md").write_bytes("# Café\n\ncaf\xe9 au lait\n".encode("latin-1"))
    (odd / "nul.md").write_bytes(b"# Binary\n\nbefore\x00after\n")
    with (odd / "huge.md").open("wb") as huge:
        huge.truncate(50 * 1024 * 1024)  # sparse: 50 MB on paper, nothing written
    os.symlink("loop.md", odd / "loop.md")
    (odd / "folder").mkdir()
    os.symlink("..", odd / "folder" / "up")  # a folder loop: walked once, silently
    (odd / "x.md").mkdir()  # a folder named like a page: walked, not read
    (odd / "x.md" / "inside.md").write_text("# Inside\n\nA page inside a folder named x.md.\n")
    (odd / "bad-yaml.md").write_text("---\ntitle: [unclosed\ntags: a\n---\n# Body\n\ntext\n")
    (odd / "crlf.md").write_bytes(b"# Windows\r\n\r\nLine endings.\r\n\r\n## Next\r\n\r\nMore.\r\n")
    (odd / "bom.md").write_bytes("\ufeff# Bom\n\nStarts with a BOM.\n".encode())
    (root / GONE).parent.mkdir()
    (root / GONE).write_text("# Gone\n\nRemoved after the walk listed it.\n")
    return {
        "odd/latin1.md": "invalid UTF-8",
        "odd/nul.md": "NUL byte",
        "odd/huge.md": "over the 5242880-byte limit",
        "odd/loop.md": "symlink loop",
        "odd/bad-yaml.md": "malformed YAML frontmatter",
        GONE: "disappeared",
    }


def bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_odd_files_are_reported_by_name_and_reason_while_the_rest_ingest(
    database_url: str, conn: Connection, tmp_path: Path, figures: CaseFigures
) -> None:
    corpus = Corpus(tmp_path / "kb", files=6, sections=3).write()
    reported = write_odd_files(corpus.root)
    figures.bad_inputs += 13
    settings = make_settings(
        database_url, stream_batch_chunks=1
    )  # one file per step: the removal lands mid-run
    embedder = RemovingEmbedder(corpus.root / GONE)

    def factory(model: EmbeddingModel, _: Any) -> CountingEmbedder:
        return embedder

    read_before = bytes_read_by_this_process()
    figures.runs += 1
    summary = run_ingest(settings, corpus.root, source_name=SOURCE, embedder_factory=factory)
    read = bytes_read_by_this_process() - read_before

    failures = {failure["path"]: failure["reason"] for failure in summary["failures"]}
    assert set(failures) == set(reported), failures
    for path, word in reported.items():
        assert word in failures[path], (path, failures[path])
    skipped = {entry["path"]: entry["reason"] for entry in summary["skipped"]}
    assert set(skipped) == EMPTY_PAGES and all(skipped.values()), skipped
    assert read < 10 * 1024 * 1024, f"the run read {read} bytes: the 50 MB file was read"
    expected = {**corpus.expected_chunks(), "odd/crlf.md": 2, "odd/bom.md": 1, "odd/x.md/inside.md": 1}
    report = check_invariants(
        conn, source=SOURCE, root=corpus.root, expected_chunks=expected, empty_documents=EMPTY_PAGES
    )
    figures.rows_checked += report.rows_expected
    figures.rows_lost += report.rows_lost
    assert report.problems == []
    contents = dict(
        conn.execute(
            "SELECT d.path || '#' || c.ordinal, c.content FROM chunks c"
            " JOIN documents d ON d.id = c.document_id"
            " WHERE d.path IN ('odd/crlf.md', 'odd/bom.md')"
        ).fetchall()
    )
    assert contents == {
        "odd/crlf.md#0": "Line endings.",
        "odd/crlf.md#1": "More.",
        "odd/bom.md#0": "Starts with a BOM.",
    }
    titles = dict(conn.execute("SELECT path, title FROM documents WHERE path LIKE 'odd/%'").fetchall())
    assert titles["odd/bom.md"] == "Bom" and titles["odd/crlf.md"] == "Windows"


def test_a_file_under_a_raised_size_limit_is_read_not_refused(
    database_url: str, tmp_path: Path, figures: CaseFigures
) -> None:
    root = tmp_path / "kb"
    root.mkdir()
    big = "---\ntitle: Big\nrag_include: false\n---\n" + ("x" * 99 + "\n") * 55_000  # 5.5 MB, not embedded
    (root / "big.md").write_text(big)
    (root / "small.md").write_text("# Small\n\nText.\n")
    figures.bad_inputs += 1
    figures.runs += 1
    summary = run_ingest(make_settings(database_url, max_file_bytes=8_000_000), root, source_name=SOURCE)
    assert summary["failures"] == []
    assert summary["documents"]["excluded"] == 1


def test_empty_and_frontmatter_only_pages_are_reported_by_name_and_reason(
    database_url: str, tmp_path: Path, figures: CaseFigures
) -> None:
    root = tmp_path / "kb"
    root.mkdir()
    (root / "empty.md").write_bytes(b"")
    (root / "frontmatter-only.md").write_text("---\ntitle: Only frontmatter\n---\n")
    (root / "page.md").write_text("# Page\n\nText.\n")
    figures.bad_inputs += 2
    figures.runs += 1
    summary = run_ingest(make_settings(database_url), root, source_name=SOURCE)
    skipped = {entry["path"]: entry["reason"] for entry in summary["skipped"]}
    assert "empty page" in skipped["empty.md"] and "frontmatter only" in skipped["frontmatter-only.md"]
    assert summary["failures"] == [] and summary["documents"]["new"] == 3
