"""Discover stage: find the Markdown files under a source root and parse them.

`walk_source` lists and hashes the files (the cheap pass every nightly run
makes); `parse_document` and `read_document` turn one file into a
`ParsedDocument`. Per-file problems never raise out of the walk: they come out
as `FileFailure` values, and the run goes on without those files.
`source_identity` gives the name a source's documents are stored under.

Walk rules:
- Globs are bash globs with globstar (matched by wcmatch), relative POSIX
  patterns: `**` as a whole segment matches zero or more folders, `*` and `?`
  never cross `/`, `[...]` is a character class, and a pattern ending in `/`
  means everything under that folder. Braces, extended globs and a leading `!`
  are literal. A file is kept when it matches an include and no exclude.
- Folders whose name starts with `.` are skipped, unless a folder segment of
  an include pattern starts with `.` and matches the name (`.github/**/*.md`).
  Dot-files are matched like any other name.
- Symlinks to files and folders inside the source root are followed. Each real
  folder is walked once: a folder reached again (a symlink loop, or two links to
  one folder) is skipped silently. Paths without a symlink win over paths
  through one, so a link `latest -> v3` yields the files under `v3/`.
- A symlink whose target (every link resolved) lies outside the source root is
  not followed unless `follow_external_links`; it is listed in
  `SourceWalk.skipped` with the reason, and nothing under it is read.
- An exclude ending in `/**` prunes the folders it covers without listing them.
- Failures: "file is N bytes, over the M-byte limit" (not read), "broken
  symlink", "symlink loop", "not a regular file" (a FIFO or device; never
  opened by the walk, and opened non-blocking after it), "permission denied",
  "file disappeared during the walk", "cannot list folder: ..." with the
  folder's path, and "file name is not valid UTF-8" (the path is reported with
  `\\xff` escapes). A symlink that does not resolve is a failure under its own
  path even when its name is not a wanted file's, since it may have been a
  folder. A caller can so tell a folder it could not see from deleted files.

Parse rules: a NUL byte means binary; offsets are byte offsets into the file.
YAML line numbers count from the top of the file (the opening `---` is line
1). Frontmatter becomes JSON-safe: dates turn into ISO strings, sets into
sorted lists, binary into base64, NaN and infinities into strings, and keys
into strings. Alias bombs, self-referencing anchors and frontmatter over
64 KiB are refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import heapq
import itertools
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter, itemgetter
from pathlib import Path, PurePosixPath
from typing import NamedTuple, TypeAlias

import yaml
from markdown_it import MarkdownIt
from wcmatch import glob
from yaml.reader import ReaderError

from tasks.records import FileFailure, FoundFile, ParsedDocument, sha256_bytes

try:
    from yaml import CSafeLoader as _FastSafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _FastSafeLoader  # type: ignore[assignment, unused-ignore]

DEFAULT_INCLUDE: tuple[str, ...] = ("**/*.md", "**/*.mdx", "**/*.markdown")
DEFAULT_MAX_BYTES = 5 * 1024 * 1024

JsonValue: TypeAlias = "str | int | float | bool | None | list[JsonValue] | dict[str, JsonValue]"

_UTF8_BOM = b"\xef\xbb\xbf"
_FALSE_WORDS = frozenset({"false", "no", "0"})
# libyaml recurses on the C stack and segfaults around 20,000 nesting levels;
# frontmatter that could nest deeper than this goes to the pure-Python loader,
# which raises RecursionError instead.
_FAST_LOADER_MAX_NESTING = 1000
_MAX_FRONTMATTER_CHARS = 64 * 1024
_MAX_FRONTMATTER_DEPTH = 64
_MAX_FRONTMATTER_VALUES = 100_000


class DocumentError(Exception):
    """A file that cannot become a document. Retrying will not help until the file changes."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class GlobError(ValueError):
    """An include or exclude pattern that was refused."""

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(pattern, reason)
        self.pattern = pattern
        self.reason = reason

    def __str__(self) -> str:
        return f"glob pattern {self.pattern!r} refused: {self.reason}"


class SourceError(ValueError):
    """A source that cannot be stored under its path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"source {self.path}: {self.reason}"


# --- globs -----------------------------------------------------------------

_GLOB_FLAGS = glob.GLOBSTAR | glob.DOTGLOB | glob.FORCEUNIX
"""Bash globs with globstar: `**` spans folders, `*` never crosses `/`, dot-names match like any other.
No braces, no extended globs and no `!` negation: those characters are literal."""
_NEVER_MATCHES = "(?!)"
"""What wcmatch puts in a translation for a part that can match nothing, such as `[z-a]`."""


def validate_glob(pattern: str) -> str:
    """Return the pattern normalised (`./` and `//` dropped), or raise GlobError."""
    if "\x00" in pattern:
        raise GlobError(pattern, "contains a NUL character")
    if "\\" in pattern:
        raise GlobError(pattern, "contains a backslash; separate folders with '/'")
    if pattern.startswith("/"):
        raise GlobError(pattern, "absolute pattern; patterns are relative to the source root")
    segments = [segment for segment in pattern.split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise GlobError(pattern, "a '..' segment would leave the source root")
    if not segments:
        raise GlobError(pattern, "empty pattern")
    if pattern.endswith("/"):
        segments.append("**")
    return "/".join(_collapse_double_stars(segments))


def _collapse_double_stars(segments: list[str]) -> list[str]:
    """`**/**` means the same as `**`."""
    collapsed: list[str] = []
    for segment in segments:
        if not (segment == "**" and collapsed[-1:] == ["**"]):
            collapsed.append(segment)
    return collapsed


def compile_globs(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A matcher that says whether a relative POSIX path matches any of the patterns."""
    checked = _checked_globs(patterns)
    if not checked:
        return lambda _path: False
    return glob.compile(checked, flags=_GLOB_FLAGS).match


def _wanted_file_matcher(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """Whether a relative path matches an include and no exclude."""
    included, excluded = _checked_globs(include), _checked_globs(exclude)
    if not included:
        return lambda _path: False
    return glob.compile(included, flags=_GLOB_FLAGS, exclude=excluded or None).match


def _checked_globs(patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        raise TypeError("glob patterns must be a sequence of strings, not one string")
    return [_checked_glob(pattern) for pattern in patterns]


def _checked_glob(pattern: str) -> str:
    """The normalised pattern; one that could never match (a backwards range) is refused."""
    normalised = validate_glob(pattern)
    try:
        (regex,), _ = glob.translate(normalised, flags=_GLOB_FLAGS)
    except ValueError as exc:
        raise GlobError(pattern, f"not a valid pattern: {exc}") from exc
    if _NEVER_MATCHES in regex:
        raise GlobError(pattern, "can never match: a character range runs backwards")
    return normalised


def _hidden_dir_matcher(include: Sequence[str]) -> Callable[[str], bool]:
    """Which dot-folder names some include pattern names explicitly."""
    dot_segments = [
        segment
        for pattern in include
        for segment in validate_glob(pattern).split("/")[:-1]
        if segment.startswith(".")
    ]
    return compile_globs(dot_segments)


def _pruned_dir_matcher(exclude: Sequence[str]) -> Callable[[str], bool]:
    """Which folders an `…/**` exclude covers entirely."""
    normalised = (validate_glob(pattern) for pattern in exclude)
    return compile_globs([pattern[:-3] for pattern in normalised if pattern.endswith("/**")])


# --- source identity ---------------------------------------------------------


def source_identity(root: str | os.PathLike[str], source_name: str | None = None) -> str:
    """The name a source's documents are stored under: `source_name`, else the folder's absolute path.

    The path is taken as given, symlinks not resolved, so a link switched to a new
    release (`current -> releases/v2`) stays the same source. Raises SourceError for a
    path that is not valid UTF-8 and has no name, since it could not be stored.
    """
    if source_name:
        return source_name
    path = os.path.abspath(os.fspath(root))
    if not _is_utf8(path):
        raise SourceError(_readable(path), "the path is not valid UTF-8; name the source instead")
    return path


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable(name: str) -> str:
    """A file name fit for a report: bytes that are not UTF-8 written as `\\xff` escapes."""
    return name if _is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


# --- walking ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WalkRules:
    wants_file: Callable[[str], bool]
    """Takes a relative file path: included and not excluded."""
    enters_hidden: Callable[[str], bool]
    """Takes a dot-folder name."""
    prunes_dir: Callable[[str], bool]
    """Takes a relative folder path."""
    root_real: str
    """The source root with every symlink resolved."""
    follow_external_links: bool


class _Folder(NamedTuple):
    """A folder waiting on the walk's heap; the order puts real paths before linked ones."""

    via_link: bool
    path: str
    """Relative path with a trailing slash, "" for the root."""
    abs_path: str


class _Candidate(NamedTuple):
    """A wanted file, listed but not read yet."""

    path: str
    abs_path: str
    """The path under the root as listed, symlinks not resolved."""
    problem: str | None = None
    """Set when the walk already knows the file cannot be read."""


class _ReadRefused(Exception):
    """A file the walk or `read_document` will not read, with a reason for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SourceWalk:
    """The files a walk listed. Iterating reads and hashes them, in order of relative path."""

    candidates: tuple[_Candidate, ...]
    max_bytes: int
    skipped: tuple[FileFailure, ...]
    """Entries left out on purpose, with the reason: symlinks whose target is outside the
    source root (unless `follow_external_links`). Complete as soon as `walk_source` returns."""

    def __iter__(self) -> Iterator[FoundFile | FileFailure]:
        for candidate in self.candidates:
            yield _found_or_failure(candidate, self.max_bytes)


def walk_source(
    root: Path,
    *,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    follow_external_links: bool = False,
) -> SourceWalk:
    """List every wanted file under `root`; iterate the result to read and hash them.

    Raises at once for a missing or unreadable root, a root that is not a folder,
    a refused glob or a negative `max_bytes`.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be 0 or more, got {max_bytes}")
    root_dir = _checked_root(root)
    rules = _WalkRules(
        wants_file=_wanted_file_matcher(include, exclude),
        enters_hidden=_hidden_dir_matcher(include),
        prunes_dir=_pruned_dir_matcher(exclude),
        root_real=os.path.realpath(root_dir),
        follow_external_links=follow_external_links,
    )
    scan = _Scan(rules)
    scan.walk(root_dir)
    return SourceWalk(
        candidates=tuple(sorted(scan.candidates, key=itemgetter(0))),
        max_bytes=max_bytes,
        skipped=tuple(sorted(scan.skipped, key=attrgetter("path"))),
    )


def _checked_root(root: Path) -> str:
    root_dir = os.path.abspath(root)
    if not os.path.exists(root_dir):
        raise FileNotFoundError(errno.ENOENT, "source root does not exist", root_dir)
    if not os.path.isdir(root_dir):
        raise NotADirectoryError(errno.ENOTDIR, "source root is not a folder", root_dir)
    return root_dir


def _found_or_failure(candidate: _Candidate, max_bytes: int) -> FoundFile | FileFailure:
    if candidate.problem is not None or not _is_utf8(candidate.path):
        return FileFailure(_readable(candidate.path), candidate.problem or _NAME_NOT_UTF8)
    try:
        data = _read_limited(candidate.abs_path, max_bytes, vanished="during the walk")
    except _ReadRefused as refused:
        return FileFailure(candidate.path, refused.reason)
    return FoundFile(candidate.path, candidate.abs_path, len(data), sha256_bytes(data))


_NAME_NOT_UTF8 = "file name is not valid UTF-8; rename the file"


class _Scan:
    """One listing of a source. Each real folder is listed once, under its first path off the heap."""

    def __init__(self, rules: _WalkRules) -> None:
        self.rules = rules
        self.candidates: list[_Candidate] = []
        self.skipped: list[FileFailure] = []
        self.visited: set[tuple[int, int]] = set()
        self.pending: list[_Folder] = []

    def walk(self, root_dir: str) -> None:
        self.pending.append(_Folder(False, "", root_dir))
        while self.pending:
            folder = heapq.heappop(self.pending)
            if _first_visit(folder.abs_path, self.visited):
                for entry in _list_dir(folder, self.candidates):
                    self._sort_entry(folder, entry, folder.path + entry.name)

    def _sort_entry(self, folder: _Folder, entry: os.DirEntry[str], rel_path: str) -> None:
        """Queue a folder, list a wanted file, or report a link that cannot be followed."""
        if _is_dir(entry):
            if _enters_dir(entry.name, rel_path, self.rules) and self._follows(entry, rel_path):
                heapq.heappush(self.pending, _subfolder(folder, entry, rel_path))
        elif self.rules.wants_file(rel_path):
            if self._follows(entry, rel_path):
                self.candidates.append(_file_candidate(entry, rel_path))
        elif entry.is_symlink() and _enters_dir(entry.name, rel_path, self.rules):
            # A link that does not resolve may have been a folder: report it, so that
            # nothing stored under its path is deleted.
            problem = _unreachable_reason(entry)
            if problem is not None and self._follows(entry, rel_path):
                self.candidates.append(_Candidate(rel_path, entry.path, problem))

    def _follows(self, entry: os.DirEntry[str], rel_path: str) -> bool:
        """False for a symlink out of the source root, which is then listed as skipped."""
        if self.rules.follow_external_links or not entry.is_symlink():
            return True
        target = os.path.realpath(entry.path)
        if target == self.rules.root_real or target.startswith(os.path.join(self.rules.root_real, "")):
            return True
        reason = f"symlink to {_readable(target)}, outside the source root"
        self.skipped.append(FileFailure(_readable(rel_path), reason))
        return False


def _subfolder(parent: _Folder, entry: os.DirEntry[str], rel_path: str) -> _Folder:
    via_link = parent.via_link or entry.is_symlink()
    return _Folder(via_link, rel_path + "/", entry.path)


def _first_visit(abs_dir: str, visited: set[tuple[int, int]]) -> bool:
    try:
        info = os.stat(abs_dir)
    except OSError:
        return False
    key = (info.st_dev, info.st_ino)
    if key in visited:
        return False
    visited.add(key)
    return True


def _list_dir(folder: _Folder, candidates: list[_Candidate]) -> list[os.DirEntry[str]]:
    """The folder's entries; an unreadable folder below the root becomes a failure."""
    try:
        with os.scandir(folder.abs_path) as entries:
            return list(entries)
    except OSError as exc:
        if not folder.path:
            raise
        if not isinstance(exc, FileNotFoundError):
            problem = f"cannot list folder: {_describe_os_error(exc, vanished='')}"
            path = folder.path.rstrip("/")
            candidates.append(_Candidate(path, folder.abs_path, problem))
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _enters_dir(name: str, rel_path: str, rules: _WalkRules) -> bool:
    if name.startswith(".") and not rules.enters_hidden(name):
        return False
    return not rules.prunes_dir(rel_path)


def _file_candidate(entry: os.DirEntry[str], rel_path: str) -> _Candidate:
    try:
        if entry.is_file():
            return _Candidate(rel_path, entry.path)
    except OSError:
        pass
    return _Candidate(rel_path, entry.path, _not_a_file_reason(entry))


def _not_a_file_reason(entry: os.DirEntry[str]) -> str:
    return _unreachable_reason(entry) or "not a regular file"


def _unreachable_reason(entry: os.DirEntry[str]) -> str | None:
    """Why the entry's target cannot be reached, or None when it can."""
    try:
        os.stat(entry.path)
    except FileNotFoundError:
        return "broken symlink" if entry.is_symlink() else "file disappeared during the walk"
    except OSError as exc:
        return _describe_os_error(exc, vanished="during the walk")
    return None


def _read_limited(abs_path: str, max_bytes: int, *, vanished: str) -> bytes:
    """Read a regular file of at most `max_bytes`; O_NONBLOCK keeps a FIFO from blocking."""
    try:
        fd = os.open(abs_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _ReadRefused(_describe_os_error(exc, vanished=vanished)) from exc
    try:
        return _read_open_file(fd, max_bytes)
    except OSError as exc:
        raise _ReadRefused(_describe_os_error(exc, vanished=vanished)) from exc
    finally:
        os.close(fd)


def _read_open_file(fd: int, max_bytes: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _ReadRefused("not a regular file")
    if info.st_size > max_bytes:
        raise _ReadRefused(_oversize_reason(info.st_size, max_bytes))
    blocks: list[bytes] = []
    remaining = max_bytes + 1
    request = min(info.st_size + 1, remaining)
    while remaining > 0 and (block := os.read(fd, request)):
        blocks.append(block)
        remaining -= len(block)
        request = min(1 << 20, remaining)
    data = b"".join(blocks)
    if len(data) > max_bytes:
        raise _ReadRefused(_oversize_reason(len(data), max_bytes))
    return data


def _oversize_reason(size: int, max_bytes: int) -> str:
    return f"file is {size} bytes, over the {max_bytes}-byte limit"


def _describe_os_error(exc: OSError, *, vanished: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file disappeared {vanished}".rstrip()
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"could not read: {exc.strerror or exc}"


# --- parsing ---------------------------------------------------------------
def read_document(found: FoundFile, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedDocument:
    """Read the file again, hash what was read, and parse it.

    Raises DocumentError when the file is gone, unreadable, has grown past
    `max_bytes` since the walk, or does not parse.
    """
    try:
        data = _read_limited(found.abs_path, max_bytes, vanished="after the walk")
    except _ReadRefused as refused:
        raise DocumentError(found.path, refused.reason) from refused
    return parse_document(found.path, data)


def parse_document(path: str, data: bytes, *, content_hash: bytes | None = None) -> ParsedDocument:
    """Decode and parse one Markdown file's bytes. Pure; raises DocumentError."""
    text = decode_markdown(path, data)
    frontmatter_text, body = split_frontmatter(text)
    frontmatter = {} if frontmatter_text is None else load_frontmatter(path, frontmatter_text)
    return ParsedDocument(
        path=path,
        content_hash=sha256_bytes(data) if content_hash is None else content_hash,
        title=_scalar_text(frontmatter.get("title")) or first_heading(body) or _file_stem(path),
        description=_description(frontmatter.get("description")),
        namespace=_namespace(path, frontmatter.get("rag_namespace")),
        tags=_string_list(frontmatter.get("tags")),
        concept_keys=_string_list(frontmatter.get("concept_keys")),
        frontmatter=frontmatter,
        body=body,
        include=not _says_false(frontmatter.get("rag_include")),
    )


def decode_markdown(path: str, data: bytes) -> str:
    """UTF-8 text with the BOM stripped and LF newlines; binary or invalid bytes raise."""
    nul_offset = data.find(b"\x00")
    if nul_offset >= 0:
        raise DocumentError(path, f"binary file: NUL byte at offset {nul_offset}")
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = (data[start:] if start else data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(path, f"invalid UTF-8 at byte {exc.start + start}") from exc
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


_FRONTMATTER_OPEN = re.compile(r"---[ \t]*\n")
_FRONTMATTER_CLOSE = re.compile(r"\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)")


def split_frontmatter(text: str) -> tuple[str | None, str]:
    """(frontmatter YAML, body). No closing line means no frontmatter: `---` is then a rule."""
    opening = _FRONTMATTER_OPEN.match(text)
    if opening is None:
        return None, text
    closing = _FRONTMATTER_CLOSE.search(text, opening.end() - 1)
    if closing is None:
        return None, text
    return text[opening.end() : closing.start() + 1], text[closing.end() :]


def load_frontmatter(path: str, yaml_text: str) -> dict[str, JsonValue]:
    """Parse frontmatter YAML into a JSON-safe mapping; empty frontmatter gives {}."""
    if len(yaml_text) > _MAX_FRONTMATTER_CHARS:
        limit = _MAX_FRONTMATTER_CHARS
        raise DocumentError(
            path, f"frontmatter is {len(yaml_text)} characters, over the {limit}-character limit"
        )
    loaded = _safe_load(path, yaml_text)
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        kind = type(loaded).__name__
        raise DocumentError(path, f"frontmatter must be a mapping of keys to values, got a {kind}")
    return _JsonSafeConverter(path).mapping(loaded, depth=0)


def _safe_load(path: str, yaml_text: str) -> object:
    loader = _FastSafeLoader if _nesting_bound(yaml_text) <= _FAST_LOADER_MAX_NESTING else yaml.SafeLoader
    try:
        return yaml.load(yaml_text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        raise DocumentError(path, _marked_yaml_error_reason(exc)) from exc
    except ReaderError as exc:
        raise DocumentError(path, _unreadable_character_reason(yaml_text, exc)) from exc
    except RecursionError as exc:
        raise DocumentError(path, "malformed YAML frontmatter: nested too deeply") from exc
    except Exception as exc:
        # PyYAML's constructors raise ValueError, AttributeError, TypeError... on hostile
        # scalars (`!!timestamp x`, `2024-13-45`, a 5,000-digit int); each is a bad file.
        problem = str(exc).split(";")[0] or type(exc).__name__
        raise DocumentError(path, f"malformed YAML frontmatter: {problem}") from exc


def _marked_yaml_error_reason(exc: yaml.MarkedYAMLError) -> str:
    """Line numbers count from the top of the file, where the opening `---` is line 1."""
    problem = exc.problem or exc.context or "unreadable YAML"
    mark = exc.problem_mark or exc.context_mark
    where = "" if mark is None else f" at line {mark.line + 2}"
    return f"malformed YAML frontmatter: {problem}{where}"


def _unreadable_character_reason(yaml_text: str, exc: ReaderError) -> str:
    """libyaml reports a byte offset and PyYAML a character offset, so find the character."""
    if not isinstance(exc.character, int):
        return f"malformed YAML frontmatter: {exc.reason}"
    character = chr(exc.character)
    reason = f"malformed YAML frontmatter: character {character!r} is not allowed"
    offset = yaml_text.find(character)
    return reason if offset < 0 else f"{reason} at line {yaml_text.count(chr(10), 0, offset) + 2}"


def _nesting_bound(yaml_text: str) -> int:
    """An upper bound on YAML nesting depth: every level costs one of these characters."""
    return sum(yaml_text.count(char) for char in "[{-?:\n")


class _JsonSafeConverter:
    """Copies loaded YAML into JSON-safe values, within a depth and size budget.

    The budget stops alias bombs and self-referencing anchors (`&a [*a]`),
    which YAML loads as shared or cyclic objects.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.values_left = _MAX_FRONTMATTER_VALUES

    def mapping(self, value: Mapping[object, object], depth: int) -> dict[str, JsonValue]:
        return {self._key(key): self.convert(item, depth + 1) for key, item in value.items()}

    def convert(self, value: object, depth: int) -> JsonValue:
        self._spend(depth)
        if isinstance(value, Mapping):
            return self.mapping(value, depth)
        if isinstance(value, (list, tuple)):
            return [self.convert(item, depth + 1) for item in value]
        if isinstance(value, (set, frozenset)):
            return sorted((self.convert(item, depth + 1) for item in value), key=str)
        return self._scalar(value)

    def _spend(self, depth: int) -> None:
        self.values_left -= 1
        if self.values_left < 0:
            limit = _MAX_FRONTMATTER_VALUES
            raise DocumentError(self.path, f"frontmatter holds more than {limit} values")
        if depth > _MAX_FRONTMATTER_DEPTH:
            limit = _MAX_FRONTMATTER_DEPTH
            raise DocumentError(self.path, f"frontmatter nests deeper than {limit} levels")

    def _key(self, key: object) -> str:
        converted = self._scalar(key)
        return converted if isinstance(converted, str) else str(key)

    def _scalar(self, value: object) -> JsonValue:
        if isinstance(value, str):
            return self._checked_text(value)
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, (dt.date, dt.datetime)):
            return value.isoformat()
        if isinstance(value, bytes):
            return base64.b64encode(value).decode("ascii")
        return self._checked_text(str(value))

    def _checked_text(self, text: str) -> str:
        if "\x00" in text:
            raise DocumentError(self.path, "frontmatter value contains a NUL character")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DocumentError(self.path, "frontmatter value is not valid Unicode") from exc
        return text


def _scalar_text(value: JsonValue) -> str | None:
    """A string or number as stripped one-line text; anything else (or blank) is None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return " ".join(str(value).split()) or None


def _description(value: JsonValue) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return str(value).strip() or None


def _string_list(value: JsonValue) -> tuple[str, ...]:
    """A YAML list or a comma-separated string, as unique non-empty strings in order."""
    if isinstance(value, str):
        items: list[JsonValue] = list(value.split(","))
    elif isinstance(value, list):
        items = value
    else:
        return ()
    texts = (_scalar_text(item) for item in items)
    return tuple(dict.fromkeys(text for text in texts if text))


def _says_false(value: JsonValue) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _FALSE_WORDS
    return value is False or (type(value) is int and value == 0)


def _namespace(path: str, declared: JsonValue) -> str:
    if isinstance(declared, str) and declared.strip():
        return declared.strip()
    return first_folder_namespace(path)


def first_folder_namespace(path: str) -> str:
    """The first folder of a relative path, or "default" for a file at the root."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return parts[0] if len(parts) > 1 else "default"


def _file_stem(path: str) -> str:
    return PurePosixPath(path).stem


# --- headings --------------------------------------------------------------

_HEADING_HINT = re.compile(r"^ {0,3}(?:#|=+[ \t]*$|-+[ \t]*$)", re.MULTILINE)
"""A line that could start an ATX heading or underline a setext one: no such line, no heading."""


@lru_cache(maxsize=1)
def _block_parser() -> MarkdownIt:
    # The chunker's block parser (tasks/chunk.py), so the title fallback and the chunks'
    # heading paths agree on what a heading is. Inline parsing is not needed.
    return MarkdownIt("commonmark").enable("table").disable("inline")


def first_heading(body: str) -> str | None:
    """Text of the first top-level heading (ATX or setext), or None.

    Headings inside code, HTML blocks (comments included), lists and quotes do not
    count. Only a prefix of the body is parsed, doubled until a heading turns up: the
    block structure of the lines before a heading never depends on the lines after it.
    """
    hint = _HEADING_HINT.search(body)
    if hint is None:
        return None
    end = _end_of_next_line(body, hint.start())
    while True:
        title = _first_heading_token(body[:end])
        if title is not None or end >= len(body):
            return title
        end = _end_of_next_line(body, 2 * end)


def _end_of_next_line(text: str, position: int) -> int:
    """The end of the line after the one holding `position`, so a setext underline is included."""
    line_end = text.find("\n", position)
    if line_end < 0:
        return len(text)
    next_end = text.find("\n", line_end + 1)
    return len(text) if next_end < 0 else next_end + 1


def _first_heading_token(text: str) -> str | None:
    tokens = _block_parser().parse(text)
    for opening, inline in itertools.pairwise(tokens):
        if opening.type == "heading_open" and opening.level == 0:
            if title := " ".join(inline.content.split()):
                return title
    return None
