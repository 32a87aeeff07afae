"""Value types handed between stages. Pure: no I/O, no driver imports."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def sha256_bytes(data: bytes) -> bytes:
    """The 32-byte SHA-256 digest used for content and embed-text hashes."""
    return hashlib.sha256(data).digest()


def sha256_text(text: str) -> bytes:
    return sha256_bytes(text.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A file the walk found: cheap facts only, the body is read again when needed."""

    path: str
    """Path relative to the source root, with forward slashes."""
    abs_path: str
    """The path as listed, symlinks not resolved."""
    size: int
    content_hash: bytes
    """SHA-256 of the raw bytes on disk."""


@dataclass(frozen=True, slots=True)
class FileFailure:
    """A file that could not be ingested, and why. The run goes on without it."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """A decoded Markdown page: frontmatter read, BOM stripped, newlines normalised."""

    path: str
    content_hash: bytes
    title: str
    description: str | None
    namespace: str
    tags: tuple[str, ...]
    concept_keys: tuple[str, ...]
    frontmatter: Mapping[str, Any]
    """The frontmatter as JSON-safe values (dates become ISO strings)."""
    body: str
    """The text after the frontmatter, with LF newlines."""
    include: bool = True
    """False when the frontmatter says `rag_include: false`."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrievable piece of a document."""

    ordinal: int
    heading_path: tuple[str, ...]
    content: str
    """The body text of the chunk, as shown to a reader."""
    embed_text: str
    """What the embedder sees: title, heading path, then the body."""
    token_count: int
    """Tokens in `embed_text`."""
    embed_hash: bytes = field(init=False)
    oversize: bool = False
    """The embed text is over the model's own token cap: a run the chunker could not split."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "embed_hash", sha256_text(self.embed_text))

    @property
    def embed_header(self) -> str:
        """The part of `embed_text` before the body (title and breadcrumb, maybe shortened).

        Stored with the chunk so a backfill rebuilds the exact embed text:
        `join_embed_text(embed_header, content)`.
        """
        if self.content and self.embed_text.endswith(self.content):
            return self.embed_text[: len(self.embed_text) - len(self.content)].removesuffix("\n\n")
        return self.embed_text if not self.content else ""


def join_embed_text(header: str, body: str) -> str:
    """Title and breadcrumb, a blank line, then the body; an empty part is left out."""
    if header and body:
        return f"{header}\n\n{body}"
    return header or body
