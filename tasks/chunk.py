"""Split a Markdown page into chunks that fit an embedding model's token cap.

Two strategies share one contract: every chunk's `token_count` is the true token
count of its `embed_text`, and never exceeds the cap.

- `chunk_by_headings` cuts the page at headings, keeps the breadcrumb of
  enclosing headings, and splits an oversize section at the coarsest boundary
  that works: between blocks, then sentences, then lines, then token windows.
  Fenced code blocks and table rows are never cut in half.
- `chunk_by_tokens` slides overlapping token windows over the whole body.

Both take an optional `token_counter`, a model's own batched count: each
embed text must then also fit the cap in that model's tokens (see
`chunk_by_headings`).

Block structure comes from `tasks.markdown.block_parser`; a section that fits
whole is never cut into blocks. Token counts come from `tasks.tokens`: while a
page is chunked, each distinct line or header part is encoded once, and long
texts are counted as the sum of their lines. Pure: no I/O.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise
from typing import Literal

from markdown_it.token import Token

from tasks.markdown import BARE_FENCE, block_parser, closes_fence
from tasks.records import Chunk, ParsedDocument, join_embed_text
from tasks.tokens import (
    TokenCounter,
    count_lines,
    count_tokens,
    encode,
    remembered_counts,
    separable_prefix,
    token_lengths,
)

ChunkerName = Literal["headings", "tokens"]

MIN_CAP = 32
"""The smallest cap either chunker accepts, in tokens."""

MIN_SCALED_CAP = 8
"""The smallest tiktoken cap a section is chunked again at to fit a model's own count."""

BREADCRUMB_SEPARATOR = " > "

_SURELY_OVER_CAP_CHARACTERS_PER_TOKEN = 6
"""More characters per token than prose or code has: a section this long is counted by lines."""

_RunKind = Literal["prose", "lines", "fence"]
"""How a run of lines may be split: prose at paragraphs, sentences, then lines;
`lines` (tables, indented code, HTML) only between lines; `fence` between lines,
with every piece re-wrapped in the fence's opening and closing lines."""

_KIND_OF_BLOCK: dict[str, _RunKind] = {
    "fence": "fence",
    "table_open": "lines",
    "code_block": "lines",
    "html_block": "lines",
}

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
"""A line with its ending; CR and CRLF end lines too, as they do for markdown-it."""

_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\r\n]*(?:\r\n|\r|\n))+")

_FENCE_OPENER = re.compile(r"[ \t>]*(?:(`{3,})[^`]*|(~{3,}).*)$", re.DOTALL)

_SENTENCE_END = re.compile(
    # ., ! or ? then closing quotes or brackets and whitespace; or a CJK full stop, ! or ?
    r"[.!?][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s*"
)


@dataclass(frozen=True, slots=True)
class _Piece:
    """A slice of a section small enough to embed, with its estimated token count."""

    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class _Run:
    """Consecutive lines of one block that split the same way."""

    kind: _RunKind
    lines: tuple[str, ...]
    fence_markup: str = ""


@dataclass(frozen=True, slots=True)
class _Block:
    """A block markdown-it found: lines `start` to `end` (exclusive)."""

    start: int
    end: int
    kind: _RunKind
    markup: str


@dataclass(frozen=True, slots=True)
class _Heading:
    start: int
    end: int
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class _Outline:
    """Where a page's headings and blocks are, by line number."""

    headings: tuple[_Heading, ...]
    blocks: tuple[_Block, ...]
    """Top-level blocks other than headings."""
    nested: tuple[_Block, ...]
    """Fences, tables, indented code and HTML inside lists and block quotes."""


@dataclass(frozen=True, slots=True)
class _Segment:
    """Lines `start` to `end` of a section: one block and the blank lines after it."""

    start: int
    end: int
    block: _Block | None


@dataclass(frozen=True, slots=True)
class _Section:
    """Lines `start` to `end` of a page, under the headings in `heading_path`."""

    heading_path: tuple[str, ...]
    lines: Sequence[str]
    """All the page's lines."""
    outline: _Outline
    start: int
    end: int

    def text(self) -> str:
        return "".join(self.lines[self.start : self.end])

    def blocks(self) -> tuple[tuple[_Run, ...], ...]:
        """The lines grouped by block; found only for a section that must be split."""
        return _section_blocks(self.lines, self.outline, self.start, self.end)


@dataclass(frozen=True, slots=True)
class _Draft:
    """A chunk before it gets its ordinal."""

    heading_path: tuple[str, ...]
    content: str
    embed_text: str
    token_count: int
    oversize: bool = False


class _BudgetOvershoot(Exception):
    """A single piece went over the cap once joined to its header."""

    def __init__(self, excess: int) -> None:
        super().__init__(f"over the cap by {excess} tokens")
        self.excess = excess


# --- public API ---------------------------------------------------------------


def build_embed_text(title: str, heading_path: Sequence[str], body: str) -> str:
    """The title, the heading breadcrumb, a blank line, then the body; empty parts left out."""
    return join_embed_text(_header(title, heading_path), body)


def chunk_by_headings(
    title: str, body: str, *, max_tokens: int = 512, token_counter: TokenCounter | None = None
) -> list[Chunk]:
    """One chunk per heading section, split further where a section is over `max_tokens`.

    With `token_counter` (a model's own, batched), each embed text also counts at
    most `max_tokens` by it: a section with a chunk over is chunked again at a
    tiktoken cap scaled down by the ratio measured, until it fits. A chunk that
    still does not fit at a tiktoken cap of `MIN_SCALED_CAP` comes back marked
    `oversize`.
    """
    _require_cap("max_tokens", max_tokens)
    with _remembering():
        sections = _sections(body)
        groups = [_chunk_section(title, section, max_tokens) for section in sections]
        if token_counter is not None:
            groups = _fit_counter(
                groups,
                lambda index, cap: _chunk_section(title, sections[index], cap),
                max_tokens,
                token_counter,
            )
    return _numbered([draft for group in groups for draft in group])


def chunk_by_tokens(
    title: str, body: str, *, size: int = 400, overlap: int = 50, token_counter: TokenCounter | None = None
) -> list[Chunk]:
    """Token windows over the stripped body, consecutive windows sharing `overlap` tokens.

    The title takes part of each window, so the embed text fits in `size`. Where the
    title leaves less than twice `overlap` for the body, the overlap shrinks to half
    the body window so the windows still move forward. With `token_counter`, a page
    with a window over `size` by that count is windowed again, size and overlap
    scaled down by the ratio measured, as `chunk_by_headings` does with a section.
    """
    _require_window(size, overlap)
    text = body.strip()
    if not text:
        return []
    with _remembering():
        drafts = _windows(title, text, size, overlap)
        if token_counter is not None:
            [drafts] = _fit_counter(
                [drafts],
                lambda _, cap: _windows(title, text, cap, overlap * cap // size),
                size,
                token_counter,
            )
    return _numbered(drafts)


def _windows(title: str, text: str, size: int, overlap: int) -> list[_Draft]:
    header = _fitted_header(title, (), size)
    window = size - _header_cost(header)
    return _token_windows(text, header, size, window, min(overlap, window // 2))


def chunk_document(
    doc: ParsedDocument,
    *,
    chunker: ChunkerName = "headings",
    max_tokens: int = 512,
    size: int = 400,
    overlap: int = 50,
    token_counter: TokenCounter | None = None,
) -> list[Chunk]:
    """Chunk a parsed page with the named chunker; a page marked `rag_include: false` gives [].

    `token_counter`, a model's own batched count (an embedder's `count_tokens`),
    caps each embed text in that model's tokens too: see `chunk_by_headings`.
    """
    if chunker == "headings":
        _require_cap("max_tokens", max_tokens)
    elif chunker == "tokens":
        _require_window(size, overlap)
    else:
        raise ValueError(f"unknown chunker {chunker!r}: expected 'headings' or 'tokens'")
    if not doc.include:
        return []
    if chunker == "headings":
        return chunk_by_headings(doc.title, doc.body, max_tokens=max_tokens, token_counter=token_counter)
    return chunk_by_tokens(doc.title, doc.body, size=size, overlap=overlap, token_counter=token_counter)


# --- parameters ---------------------------------------------------------------


def _require_cap(name: str, value: int) -> None:
    if value < MIN_CAP:
        raise ValueError(f"{name} must be at least {MIN_CAP} tokens, got {value}")


def _require_window(size: int, overlap: int) -> None:
    _require_cap("size", size)
    if overlap < 0:
        raise ValueError(f"overlap must not be negative, got {overlap}")
    if overlap >= size:
        raise ValueError(f"overlap ({overlap}) must be smaller than size ({size})")


# --- embed text and its header ------------------------------------------------


_truncations: ContextVar[dict[tuple[str, int], str] | None] = ContextVar("truncations", default=None)
"""Titles and breadcrumbs already cut to a number of tokens, while one page is chunked."""


@contextmanager
def _remembering() -> Iterator[None]:
    """While one page is chunked, count each distinct text and cut each title once."""
    reset = _truncations.set({}) if _truncations.get() is None else None
    try:
        with remembered_counts():
            yield
    finally:
        if reset is not None:
            _truncations.reset(reset)


def _header(title: str, heading_path: Sequence[str]) -> str:
    breadcrumb = BREADCRUMB_SEPARATOR.join(h.strip() for h in heading_path if h.strip())
    return "\n".join(part for part in (title.strip(), breadcrumb) if part)


def _header_cost(header: str, ceiling: int | None = None) -> int:
    """Tokens the header and its blank line take from the cap (some number over `ceiling` if over it)."""
    return count_lines(header + "\n\n", ceiling=ceiling) if header else 0


def _fitted_header(title: str, heading_path: Sequence[str], cap: int) -> str:
    """The header, with title and breadcrumb cut short if it would take over half the cap."""
    header = _header(title, heading_path)
    limit = cap // 2
    if _header_cost(header, ceiling=limit) <= limit:
        return header
    title = title.strip()
    breadcrumb = _header("", heading_path)
    # Only counts up to `available` (below `limit`) change the shares below.
    title_tokens = count_lines(title, ceiling=limit)
    breadcrumb_tokens = count_lines(breadcrumb, ceiling=limit)
    available = limit - 3
    while available > 0:
        title_share = min(title_tokens, max(available // 2, available - breadcrumb_tokens))
        shortened = _header(
            _truncate_to_tokens(title, title_share),
            (_truncate_to_tokens(breadcrumb, available - title_share),),
        )
        excess = _header_cost(shortened) - limit
        if excess <= 0:
            return shortened
        available -= excess
    return ""


def _truncate_to_tokens(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` tokens that ends on a whole character."""
    if limit <= 0:
        return ""
    text = separable_prefix(text, limit)  # the same cut, from fewer tokens
    memory = _truncations.get()
    if memory is None:
        return _truncated(text, limit)
    key = (text, limit)
    if key not in memory:
        memory[key] = _truncated(text, limit)
    return memory[key]


def _truncated(text: str, limit: int) -> str:
    tokens = encode(text)
    if len(tokens) <= limit:
        return text
    raw = text.encode("utf-8")
    offsets = _byte_offsets(tokens)
    end = _clean_end(raw, offsets, 0, limit)
    return raw[: offsets[end]].decode("utf-8").rstrip()


# --- finding sections ---------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    return _LINE.findall(text)


def _outline(body: str) -> _Outline:
    tokens = block_parser().parse(body)
    headings: list[_Heading] = []
    blocks: list[_Block] = []
    nested: list[_Block] = []
    for index, token in enumerate(tokens):
        if token.map is None or token.nesting == -1:
            continue
        start, end = token.map
        if token.level == 0 and token.type == "heading_open":
            headings.append(_Heading(start, end, int(token.tag[1:]), _heading_text(tokens[index + 1])))
        elif token.level == 0:
            blocks.append(_Block(start, end, _KIND_OF_BLOCK.get(token.type, "prose"), token.markup))
        elif token.type in _KIND_OF_BLOCK:
            nested.append(_Block(start, end, _KIND_OF_BLOCK[token.type], token.markup))
    return _Outline(tuple(headings), tuple(blocks), tuple(nested))


def _heading_text(inline: Token) -> str:
    return " ".join(inline.content.split())


def _heading_paths(headings: Sequence[_Heading]) -> list[tuple[str, ...]]:
    """For each heading, the texts of the headings that enclose it, then its own."""
    stack: list[_Heading] = []
    paths: list[tuple[str, ...]] = []
    for heading in headings:
        while stack and stack[-1].level >= heading.level:
            stack.pop()
        stack.append(heading)
        paths.append(tuple(h.text for h in stack))
    return paths


def _sections(body: str) -> list[_Section]:
    """The text before the first heading, then each heading's lines up to the next heading."""
    lines = _split_lines(body)
    outline = _outline(body)
    starts = [0] + [h.end for h in outline.headings]
    ends = [h.start for h in outline.headings] + [len(lines)]
    paths: list[tuple[str, ...]] = [(), *_heading_paths(outline.headings)]
    return [
        _Section(path, lines, outline, start, end)
        for path, start, end in zip(paths, starts, ends, strict=True)
        if start < end
    ]


def _section_blocks(
    lines: Sequence[str], outline: _Outline, start: int, end: int
) -> tuple[tuple[_Run, ...], ...]:
    """A section's lines grouped by block; each block keeps the blank lines after it."""
    inside = _blocks_starting_in(outline.blocks, start, end)
    cuts = [start] + [b.start for b in inside if b.start > start] + [end]
    block_at = {b.start: b for b in inside}
    segments = [_Segment(cut, next_cut, block_at.get(cut)) for cut, next_cut in pairwise(cuts)]
    return tuple(
        _block_runs(lines, outline.nested, segment)
        for segment in _join_literal_fence_segments(lines, segments)
    )


def _block_runs(lines: Sequence[str], nested: Sequence[_Block], segment: _Segment) -> tuple[_Run, ...]:
    block = segment.block
    if block is None:
        return tuple(_carve_literal_fences(lines[segment.start : segment.end], "prose"))
    if block.kind == "prose":
        runs = _carve_nested(lines, nested, block.start, block.end)
    else:
        runs = _runs_of(block, lines)
    if block.end < segment.end:
        runs.append(_Run("prose", tuple(lines[block.end : segment.end])))
    return tuple(runs)


def _join_literal_fence_segments(lines: Sequence[str], segments: Sequence[_Segment]) -> list[_Segment]:
    """Segments with a literal fence that runs across several of them joined into one.

    In MDX a fence inside an HTML block often holds blank lines, which end the
    HTML block in CommonMark and leave the fence spread over several blocks.
    """
    closers = _LiteralFenceClosers.of(lines, segments)
    joined: list[_Segment] = []
    index = 0
    while index < len(segments):
        last = _last_segment_of_open_fence(lines, segments, index, closers)
        if last == index:
            joined.append(segments[index])
        else:
            block = _Block(segments[index].start, segments[last].end, "lines", "")
            joined.append(_Segment(block.start, block.end, block))
        index = last + 1
    return joined


@dataclass(frozen=True, slots=True)
class _LiteralFenceClosers:
    """Where a literal fence left open in a section's segments could be closed."""

    segment_starts: list[int]
    fence_segments: list[int]
    """Indexes of the segments that are fences to markdown-it; no literal fence spans one."""
    lines: list[int]
    """Line numbers of the bare fence lines, each with its markup in `markups`."""
    markups: list[str]

    @classmethod
    def of(cls, lines: Sequence[str], segments: Sequence[_Segment]) -> _LiteralFenceClosers:
        bare = [
            (number, match.group(1))
            for number in range(segments[0].start, segments[-1].end)
            if (match := BARE_FENCE.fullmatch(lines[number]))
        ]
        return cls(
            segment_starts=[segment.start for segment in segments],
            fence_segments=[
                index
                for index, segment in enumerate(segments)
                if segment.block is not None and segment.block.kind == "fence"
            ],
            lines=[number for number, _ in bare],
            markups=[markup for _, markup in bare],
        )

    def closing(self, after_segment: int, markup: str) -> tuple[int, int] | None:
        """The segment and line, past `after_segment`, that close a fence opened by `markup`."""
        if after_segment + 1 >= len(self.segment_starts):
            return None
        first = bisect_left(self.lines, self.segment_starts[after_segment + 1])
        for line, candidate in zip(self.lines[first:], self.markups[first:], strict=True):
            if candidate[0] == markup[0] and len(candidate) >= len(markup):
                segment = bisect_left(self.segment_starts, line + 1) - 1
                fence = bisect_left(self.fence_segments, after_segment + 1)
                if fence < len(self.fence_segments) and self.fence_segments[fence] <= segment:
                    return None
                return segment, line
        return None


def _last_segment_of_open_fence(
    lines: Sequence[str], segments: Sequence[_Segment], first: int, closers: _LiteralFenceClosers
) -> int:
    """The segment that closes a literal fence left open in `first`, or `first` itself."""
    block = segments[first].block
    if block is not None and block.kind == "fence":
        return first
    last, scan_from = first, segments[first].start
    while True:
        _, open_markup = _literal_fences(lines[scan_from : segments[last].end])
        closing = None if open_markup is None else closers.closing(last, open_markup)
        if closing is None:
            return last
        last, closer_line = closing
        scan_from = closer_line + 1


def _blocks_starting_in(blocks: Sequence[_Block], start: int, end: int) -> Sequence[_Block]:
    """The blocks, sorted by start line, that start in lines `start` to `end`."""
    first = bisect_left(blocks, start, key=_block_start)
    last = bisect_left(blocks, end, lo=first, key=_block_start)
    return blocks[first:last]


def _block_start(block: _Block) -> int:
    return block.start


def _carve_nested(lines: Sequence[str], nested: Sequence[_Block], start: int, end: int) -> list[_Run]:
    """Prose lines with the fences and tables inside them set apart as runs of their own."""
    runs: list[_Run] = []
    position = start
    for block in _blocks_starting_in(nested, start, end):
        if block.start < position:
            continue
        runs.extend(_carve_literal_fences(lines[position : block.start], "prose"))
        runs.extend(_runs_of(block, lines))
        position = block.end
    runs.extend(_carve_literal_fences(lines[position:end], "prose"))
    return runs


def _runs_of(block: _Block, lines: Sequence[str]) -> list[_Run]:
    block_lines = lines[block.start : block.end]
    if block.kind == "lines":
        return _carve_literal_fences(block_lines, "lines")
    return [_Run(block.kind, tuple(block_lines), block.markup)]


def _carve_literal_fences(lines: Sequence[str], kind: _RunKind) -> list[_Run]:
    """Runs of `kind`, with fence-shaped stretches set apart so they are kept whole too.

    MDX pages put fences inside HTML blocks, indented code and paragraphs, where
    CommonMark does not see them as fences; an author still means them as code.
    """
    runs: list[_Run] = []
    position = 0
    for start, end, markup in _literal_fences(lines)[0]:
        if start > position:
            runs.append(_Run(kind, tuple(lines[position:start])))
        runs.append(_Run("fence", tuple(lines[start:end]), markup))
        position = end
    if position < len(lines):
        runs.append(_Run(kind, tuple(lines[position:])))
    return runs


def _literal_fences(lines: Sequence[str]) -> tuple[list[tuple[int, int, str]], str | None]:
    """Fence-shaped stretches as (start, end, markup), and the markup of one left open."""
    fences: list[tuple[int, int, str]] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPENER.match(lines[index])
        if opening is None:
            index += 1
            continue
        markup = opening.group(1) or opening.group(2)
        close = next((i for i in range(index + 1, len(lines)) if closes_fence(lines[i], markup)), None)
        if close is None:
            return fences, markup
        fences.append((index, close + 1, markup))
        index = close + 1
    return fences, None


# --- chunking a section -------------------------------------------------------


def _chunk_section(title: str, section: _Section, cap: int) -> list[_Draft]:
    header = _fitted_header(title, section.heading_path, cap)
    content = _trim_blank_lines(section.text())
    if not content:
        return []
    # The content's first line holds a non-space character, so header and body count apart.
    # A long section will be split: count it by lines, which the split counts again.
    count = count_lines if len(content) > _SURELY_OVER_CAP_CHARACTERS_PER_TOKEN * cap else count_tokens
    tokens = _header_cost(header) + count(content)
    if tokens <= cap:  # most sections fit whole
        return [_Draft(section.heading_path, content, join_embed_text(header, content), tokens)]
    return _split_section(section, header, cap)


def _split_section(section: _Section, header: str, cap: int) -> list[_Draft]:
    """Chunks of a section over the cap; the budget shrinks if a piece overshoots it."""
    budget = cap - _header_cost(header)
    blocks = section.blocks()
    while budget > 0:
        pieces = [piece for runs in blocks for piece in _split_block(runs, budget)]
        try:
            return _pack(pieces, section.heading_path, header, cap, budget)
        except _BudgetOvershoot as overshoot:
            budget -= overshoot.excess
    raise RuntimeError(f"cannot fit a section under {section.heading_path!r} into {cap} tokens")


def _pack(
    pieces: Sequence[_Piece], heading_path: tuple[str, ...], header: str, cap: int, budget: int
) -> list[_Draft]:
    """Greedily fill chunks with consecutive pieces, checking each against the true count."""
    drafts: list[_Draft] = []
    start = 0
    while start < len(pieces):
        end = _greedy_end(pieces, start, budget)
        draft, start = _fit_group(pieces, start, end, heading_path, header, cap)
        if draft is not None:
            drafts.append(draft)
    return drafts


def _greedy_end(pieces: Sequence[_Piece], start: int, budget: int) -> int:
    total = pieces[start].tokens
    end = start + 1
    while end < len(pieces) and total + pieces[end].tokens <= budget:
        total += pieces[end].tokens
        end += 1
    return end


def _fit_group(
    pieces: Sequence[_Piece],
    start: int,
    end: int,
    heading_path: tuple[str, ...],
    header: str,
    cap: int,
) -> tuple[_Draft | None, int]:
    """The draft for pieces[start:end], dropping pieces from the end until it fits the cap."""
    while True:
        content = _trim_blank_lines("".join(piece.text for piece in pieces[start:end]))
        if not content:
            return None, end
        tokens = _header_cost(header) + count_lines(content)
        if tokens <= cap:
            return _Draft(heading_path, content, join_embed_text(header, content), tokens), end
        if end - start == 1:
            raise _BudgetOvershoot(tokens - cap)
        end -= 1


def _trim_blank_lines(text: str) -> str:
    return _LEADING_BLANK_LINES.sub("", text.rstrip())


def _split_block(runs: Sequence[_Run], budget: int) -> list[_Piece]:
    text = "".join(line for run in runs for line in run.lines)
    tokens = count_lines(text)
    if tokens <= budget:
        return [_Piece(text, tokens)]
    return [piece for run in runs for piece in _split_run(run, budget)]


def _split_run(run: _Run, budget: int) -> list[_Piece]:
    if run.kind == "fence":
        return _split_fence(run, budget)
    splitters = _PROSE_SPLITTERS if run.kind == "prose" else _LINE_SPLITTERS
    text = "".join(run.lines)
    return _split_text(text, count_lines(text), budget, splitters)


def _split_text(
    text: str, tokens: int, budget: int, splitters: Sequence[Callable[[str], list[str]]]
) -> list[_Piece]:
    """Pieces within `budget`, cut by the first splitter that cuts, then by finer ones."""
    if tokens <= budget:
        return [_Piece(text, tokens)]
    for index, splitter in enumerate(splitters):
        parts = splitter(text)
        if len(parts) > 1:
            finer = splitters[index + 1 :]
            return [piece for part in parts for piece in _split_text(part, count_lines(part), budget, finer)]
    return _split_by_token_windows(text, budget)


def _split_paragraphs(text: str) -> list[str]:
    """Cut before each non-blank line that follows a blank one."""
    parts: list[str] = []
    current: list[str] = []
    after_blank = False
    for line in _split_lines(text):
        blank = not line.strip()
        if current and after_blank and not blank:
            parts.append("".join(current))
            current = []
        current.append(line)
        after_blank = blank
    parts.append("".join(current))
    return parts


def _split_sentences(text: str) -> list[str]:
    cuts = [match.end() for match in _SENTENCE_END.finditer(text) if match.end() < len(text)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds) if a < b]


_PROSE_SPLITTERS: tuple[Callable[[str], list[str]], ...] = (
    _split_paragraphs,
    _split_sentences,
    _split_lines,
)
_LINE_SPLITTERS: tuple[Callable[[str], list[str]], ...] = (_split_lines,)


# --- fences -------------------------------------------------------------------


def _split_fence(run: _Run, budget: int) -> list[_Piece]:
    """Groups of the fence's lines, each wrapped in the fence's opening and closing lines."""
    opener, inner, closer = _fence_parts(run)
    overhead = count_lines(opener) + count_lines(closer)
    inner_budget = budget - overhead
    if not inner or inner_budget < budget // 4:
        # The fence lines alone nearly fill the budget: cut it like any other lines.
        text = "".join(run.lines)
        return _split_text(text, count_lines(text), budget, _LINE_SPLITTERS)
    inner_pieces = [
        piece for line in inner for piece in _split_text(line, count_lines(line), inner_budget, ())
    ]
    return [
        _Piece(opener + _joined_lines(group) + closer, overhead + sum(p.tokens for p in group))
        for group in _greedy_groups(inner_pieces, inner_budget)
    ]


def _joined_lines(pieces: Sequence[_Piece]) -> str:
    """The pieces' text, ending in a newline so a closing fence line can follow."""
    return _with_newline("".join(piece.text for piece in pieces))


def _fence_parts(run: _Run) -> tuple[str, list[str], str]:
    """The opening line, the code lines, and a closing line (written if the fence had none)."""
    opener = _with_newline(run.lines[0])
    markup = run.fence_markup or "```"
    has_closer = len(run.lines) > 1 and closes_fence(run.lines[-1], markup)
    inner = list(run.lines[1:-1] if has_closer else run.lines[1:])
    closer = run.lines[-1] if has_closer else opener[: max(opener.find(markup), 0)] + markup
    return opener, inner, _with_newline(closer)


def _with_newline(line: str) -> str:
    return line if line.endswith(("\n", "\r")) else line + "\n"


def _greedy_groups(pieces: Sequence[_Piece], budget: int) -> list[list[_Piece]]:
    groups: list[list[_Piece]] = []
    start = 0
    while start < len(pieces):
        end = _greedy_end(pieces, start, budget)
        groups.append(list(pieces[start:end]))
        start = end
    return groups


# --- token windows ------------------------------------------------------------


def _byte_offsets(tokens: Sequence[int]) -> list[int]:
    """Where each token starts in the UTF-8 bytes, plus the end."""
    return list(accumulate(map(token_lengths().__getitem__, tokens), initial=0))


def _splits_character(raw: bytes, offset: int) -> bool:
    return offset < len(raw) and 0x80 <= raw[offset] < 0xC0


def _clean_end(raw: bytes, offsets: Sequence[int], start: int, end: int) -> int:
    """The nearest token boundary at or before `end` that does not split a character."""
    last = len(offsets) - 1
    end = min(end, last)
    back = end
    while back > start and _splits_character(raw, offsets[back]):
        back -= 1
    if back > start:
        return back
    while end < last and _splits_character(raw, offsets[end]):
        end += 1
    return end


def _clean_start(raw: bytes, offsets: Sequence[int], start: int, end: int) -> int:
    while start < end and _splits_character(raw, offsets[start]):
        start += 1
    return start


def _split_by_token_windows(text: str, budget: int) -> list[_Piece]:
    """Consecutive slices of `text` of at most `budget` tokens, cut between characters."""
    raw = text.encode("utf-8")
    offsets = _byte_offsets(encode(text))
    pieces: list[_Piece] = []
    start = 0
    while start < len(offsets) - 1:
        end = start + budget
        while True:
            end = _clean_end(raw, offsets, start, end)
            piece = raw[offsets[start] : offsets[end]].decode("utf-8")
            tokens = count_lines(piece)
            if tokens <= budget or end - start <= 1:
                break
            end = max(start + 1, end - (tokens - budget))
        pieces.append(_Piece(piece, tokens))
        start = end
    return pieces


def _token_windows(text: str, header: str, cap: int, window: int, overlap: int) -> list[_Draft]:
    raw = text.encode("utf-8")
    offsets = _byte_offsets(encode(text))
    last = len(offsets) - 1
    drafts: list[_Draft] = []
    start = 0
    while True:
        end, draft = _fit_window(raw, offsets, start, start + window, header, cap)
        if draft.content.strip():
            drafts.append(draft)
        if end >= last:
            return drafts
        start = _clean_start(raw, offsets, max(end - overlap, start + 1), end)


def _fit_window(
    raw: bytes, offsets: Sequence[int], start: int, end: int, header: str, cap: int
) -> tuple[int, _Draft]:
    """The longest window from `start` to at most `end` whose embed text fits the cap."""
    while True:
        end = _clean_end(raw, offsets, start, end)
        content = raw[offsets[start] : offsets[end]].decode("utf-8")
        embed_text = join_embed_text(header, content)
        tokens = count_tokens(embed_text)
        if tokens <= cap:
            return end, _Draft((), content, embed_text, tokens)
        if end - start <= 1:
            raise RuntimeError(f"cannot fit a token window into {cap} tokens")
        end = max(start + 1, end - (tokens - cap))


# --- the model's own count ----------------------------------------------------


def _fit_counter(
    groups: Sequence[list[_Draft]],
    rechunk: Callable[[int, int], list[_Draft]],
    cap: int,
    counter: TokenCounter,
) -> list[list[_Draft]]:
    """The groups (a section's drafts each), those with a draft over `cap` by `counter` redone.

    `rechunk(index, tiktoken_cap)` redoes group `index` at a lower cap, scaled by
    the worst ratio measured; every round counts all redone drafts in one call.
    """
    groups, caps = list(groups), [cap] * len(groups)
    pending = list(range(len(groups)))
    while pending:
        counts = _counted([groups[index] for index in pending], counter)
        redo: list[int] = []
        for index, group_counts in zip(pending, counts, strict=True):
            worst = max(group_counts, default=0)
            if worst <= cap:
                continue
            scaled = min(caps[index] - 1, caps[index] * cap // worst)
            if scaled < MIN_SCALED_CAP:
                groups[index] = _marked_oversize(groups[index], group_counts, cap)
                continue
            caps[index], groups[index] = scaled, rechunk(index, scaled)
            redo.append(index)
        pending = redo
    return groups


def _counted(groups: Sequence[Sequence[_Draft]], counter: TokenCounter) -> list[list[int]]:
    """Each group's drafts counted by `counter`, all in one call."""
    texts = [draft.embed_text for group in groups for draft in group]
    counts = list(counter(texts))
    if len(counts) != len(texts):
        raise ValueError(f"the token counter gave {len(counts)} counts for {len(texts)} texts")
    bounds = list(accumulate((len(group) for group in groups), initial=0))
    return [counts[start:end] for start, end in pairwise(bounds)]


def _marked_oversize(drafts: Sequence[_Draft], counts: Sequence[int], cap: int) -> list[_Draft]:
    return [
        replace(draft, oversize=True) if count > cap else draft
        for draft, count in zip(drafts, counts, strict=True)
    ]


# --- numbering ----------------------------------------------------------------


def _numbered(drafts: Sequence[_Draft]) -> list[Chunk]:
    return [
        Chunk(
            ordinal=ordinal,
            heading_path=draft.heading_path,
            content=draft.content,
            embed_text=draft.embed_text,
            token_count=draft.token_count,
            oversize=draft.oversize,
        )
        for ordinal, draft in enumerate(drafts)
    ]
