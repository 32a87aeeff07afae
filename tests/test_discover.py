"""Tests for the discover stage: globs, the walk, and Markdown parsing."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from tasks.discover import (
    DEFAULT_INCLUDE,
    DocumentError,
    GlobError,
    SourceError,
    compile_globs,
    first_folder_namespace,
    first_heading,
    parse_document,
    read_document,
    source_identity,
    validate_glob,
    walk_source,
)
from tasks.records import FileFailure, FoundFile, ParsedDocument, sha256_bytes

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def write(root: Path, relative: str, content: str | bytes = "# Title\n") -> Path:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        target.write_text(content, encoding="utf-8")
    else:
        target.write_bytes(content)
    return target


def walk_paths(
    root: Path, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()
) -> list[str]:
    return [item.path for item in walk_source(root, include=include, exclude=exclude)]


def found_files(root: Path) -> dict[str, FoundFile]:
    return {item.path: item for item in walk_source(root) if isinstance(item, FoundFile)}


def failures(items: Iterable[FoundFile | FileFailure]) -> dict[str, str]:
    return {item.path: item.reason for item in items if isinstance(item, FileFailure)}


def parse(text: str, path: str = "docs/page.md") -> ParsedDocument:
    return parse_document(path, text.encode("utf-8"))


def reason_of(data: bytes, path: str = "docs/page.md") -> str:
    with pytest.raises(DocumentError) as caught:
        parse_document(path, data)
    assert caught.value.path == path
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    return caught.value.reason


# --- globs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("**/*.md", "a.md", True),
        ("**/*.md", "x/y/a.md", True),
        ("**/*.md", "a.mdx", False),
        ("*.md", "a.md", True),
        ("*.md", "x/a.md", False),
        ("docs/**/*.md", "docs/a.md", True),
        ("docs/**/*.md", "docs/x/y/a.md", True),
        ("docs/**/*.md", "other/docs/a.md", False),
        ("docs/*/a.md", "docs/x/y/a.md", False),
        ("?.md", "a.md", True),
        ("?.md", "ab.md", False),
        ("a?b.md", "a/b.md", False),
        ("[ab].md", "b.md", True),
        ("[!ab].md", "c.md", True),
        ("[!ab].md", "a.md", False),
        ("a[!x]b.md", "a/b.md", False),
        ("drafts/", "drafts/x/y.md", True),
        ("drafts/**", "drafts/a.md", True),
        ("drafts/**", "drafts.md", False),
        ("./docs//*.md", "docs/a.md", True),
        ("**/**/*.md", "a.md", True),
        ("*a*b*c.md", "xaxbxc.md", True),
        ("*a*b*c.md", "xaxcxb.md", False),
        ("[unclosed.md", "[unclosed.md", True),
    ],
)
def test_glob_matching(pattern: str, path: str, expected: bool) -> None:
    assert compile_globs([pattern])(path) is expected


def test_glob_with_many_stars_does_not_backtrack_forever() -> None:
    matches = compile_globs(["*a*a*a*a*a*a*a*a*a*b"])
    assert matches("a" * 200) is False


@pytest.mark.parametrize(
    "pattern",
    ["../x", "/etc/*", "a/../../b", "docs/..", "", "./", "a\x00b", "C:\\docs\\*.md", "[z-a].md"],
)
def test_hostile_and_broken_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(GlobError) as caught:
        compile_globs([pattern])
    assert caught.value.pattern == pattern
    assert repr(pattern) in str(caught.value)


def test_validate_glob_normalises_and_returns_the_pattern() -> None:
    assert validate_glob("./docs//**/**/*.md") == "docs/**/*.md"
    assert validate_glob("drafts/") == "drafts/**"
    with pytest.raises(GlobError, match="leave the source root"):
        validate_glob("a/../../b")
    with pytest.raises(GlobError, match="absolute"):
        validate_glob("/etc/*")


@pytest.mark.parametrize(
    ("pattern", "path"),
    [("!x.md", "!x.md"), ("{a,b}.md", "{a,b}.md"), ("+(a).md", "+(a).md"), ("#x.md", "#x.md")],
)
def test_braces_extended_globs_and_negation_are_literal(pattern: str, path: str) -> None:
    assert compile_globs([pattern])(path) is True
    assert compile_globs([pattern])("a.md") is False


def test_star_does_not_match_a_trailing_newline() -> None:
    matches = compile_globs(["*.md"])
    assert matches("line\nbreak.md") is True
    assert matches("x.md\n") is False


def test_source_is_the_absolute_path_as_given_or_the_name(tmp_path: Path) -> None:
    (tmp_path / "releases" / "v1").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "v1", target_is_directory=True)
    assert source_identity(tmp_path / "current") == str(tmp_path / "current")
    assert source_identity(tmp_path / "current" / ".." / "current/") == str(tmp_path / "current")
    assert source_identity(tmp_path / "current", "handbook") == "handbook"
    relative = os.path.relpath(tmp_path / "current")
    assert source_identity(Path(relative)) == str(tmp_path / "current")


def test_a_source_path_that_is_not_utf8_needs_a_name() -> None:
    path = os.fsdecode(b"/srv/caf\xe9")
    with pytest.raises(SourceError) as caught:
        source_identity(path)
    assert str(caught.value) == "source /srv/caf\\xe9: the path is not valid UTF-8; name the source instead"
    assert source_identity(path, "cafe") == "cafe"


def test_one_string_instead_of_a_list_of_patterns_is_refused() -> None:
    with pytest.raises(TypeError):
        compile_globs("**/*.md")


def test_errors_survive_pickling() -> None:
    document_error = pickle.loads(pickle.dumps(DocumentError("a.md", "binary file")))
    glob_error = pickle.loads(pickle.dumps(GlobError("../x", "leaves the root")))
    assert (document_error.path, document_error.reason) == ("a.md", "binary file")
    assert (glob_error.pattern, glob_error.reason) == ("../x", "leaves the root")


# --- walking ---------------------------------------------------------------


def test_walk_applies_include_and_exclude_with_excludes_winning(tmp_path: Path) -> None:
    for relative in ["a.md", "b.txt", "docs/c.mdx", "docs/drafts/d.md", "e.markdown", "f.tmp.md"]:
        write(tmp_path, relative)
    assert walk_paths(tmp_path) == [
        "a.md",
        "docs/c.mdx",
        "docs/drafts/d.md",
        "e.markdown",
        "f.tmp.md",
    ]
    excluded = walk_paths(tmp_path, exclude=["**/drafts/**", "*.tmp.md"])
    assert excluded == ["a.md", "docs/c.mdx", "e.markdown"]
    assert walk_paths(tmp_path, include=["docs/**/*.md"]) == ["docs/drafts/d.md"]
    assert walk_paths(tmp_path, include=["*.md"], exclude=["*.md"]) == []


def test_walk_is_sorted_by_relative_path(tmp_path: Path) -> None:
    for relative in ["b.md", "a/z.md", "a-b.md", "A.md", "a/b/c.md", "a.md"]:
        write(tmp_path, relative)
    paths = walk_paths(tmp_path)
    assert paths == sorted(paths)
    assert paths == ["A.md", "a-b.md", "a.md", "a/b/c.md", "a/z.md", "b.md"]
    assert walk_paths(tmp_path) == paths


def test_found_file_holds_size_hash_and_absolute_path(tmp_path: Path) -> None:
    data = b"# Hello\n\nworld\n"
    write(tmp_path, "docs/hello.md", data)
    found = found_files(tmp_path)["docs/hello.md"]
    assert found.abs_path == str(tmp_path / "docs" / "hello.md")
    assert os.path.isabs(found.abs_path)
    assert (found.size, found.content_hash) == (len(data), sha256_bytes(data))


def test_walk_skips_hidden_folders_unless_an_include_names_them(tmp_path: Path) -> None:
    for relative in [".git/x.md", ".obsidian/y.md", "docs/.cache/z.md", ".hidden.md", "a.md"]:
        write(tmp_path, relative)
    assert walk_paths(tmp_path) == [".hidden.md", "a.md"]
    assert walk_paths(tmp_path, include=[".obsidian/*.md"]) == [".obsidian/y.md"]


def test_symlink_loop_terminates_and_each_file_is_found_once(tmp_path: Path) -> None:
    write(tmp_path, "a/page.md")
    write(tmp_path, "a/b/deep.md")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "root").symlink_to(tmp_path, target_is_directory=True)
    assert walk_paths(tmp_path) == ["a/b/deep.md", "a/page.md"]


def test_real_folder_wins_over_a_symlink_to_it(tmp_path: Path) -> None:
    write(tmp_path, "v3/page.md")
    (tmp_path / "latest").symlink_to("v3", target_is_directory=True)
    assert walk_paths(tmp_path) == ["v3/page.md"]


def test_symlinks_inside_the_root_are_followed(tmp_path: Path) -> None:
    write(tmp_path, "local.md")
    write(tmp_path, ".store/v1/guide.md", "# Guide\n")
    (tmp_path / "docs").symlink_to(".store/v1", target_is_directory=True)
    (tmp_path / "alias.md").symlink_to(tmp_path / "local.md")
    walk = walk_source(tmp_path)
    files = {item.path: item for item in walk if isinstance(item, FoundFile)}
    assert sorted(files) == ["alias.md", "docs/guide.md", "local.md"]
    assert files["docs/guide.md"].abs_path == str(tmp_path / "docs" / "guide.md")
    assert files["alias.md"].content_hash == files["local.md"].content_hash
    assert walk.skipped == ()


def outside_links(tmp_path: Path) -> Path:
    """A source with a file link and a folder link that leave it, and a link that comes back in."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside, "shared/guide.md", "# Guide\n")
    write(outside, "secret.md", "# Secret\n")
    write(root, "local.md")
    (root / "shared").symlink_to(outside / "shared", target_is_directory=True)
    (root / "passwd.md").symlink_to(outside / "secret.md")
    (outside / "back").symlink_to(root, target_is_directory=True)
    (root / "detour.md").symlink_to(outside / "back" / "local.md")
    return root


def test_symlinks_that_leave_the_root_are_skipped_and_listed(tmp_path: Path) -> None:
    root = outside_links(tmp_path)
    walk = walk_source(root)
    assert [item.path for item in walk] == ["detour.md", "local.md"]
    outside = (tmp_path / "outside").resolve()
    assert {item.path: item.reason for item in walk.skipped} == {
        "passwd.md": f"symlink to {outside / 'secret.md'}, outside the source root",
        "shared": f"symlink to {outside / 'shared'}, outside the source root",
    }


def test_symlinks_that_leave_the_root_are_followed_when_asked(tmp_path: Path) -> None:
    root = outside_links(tmp_path)
    walk = walk_source(root, follow_external_links=True)
    files = {item.path: item for item in walk if isinstance(item, FoundFile)}
    assert sorted(files) == ["detour.md", "local.md", "passwd.md", "shared/guide.md"]
    assert files["shared/guide.md"].abs_path == str(root / "shared" / "guide.md")
    assert walk.skipped == ()


def test_a_link_out_to_etc_passwd_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "ok.md")
    (tmp_path / "passwd.md").symlink_to("/etc/passwd")
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str, flags: int, *args: int) -> int:
        opened.append(str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", recording_open)
    walk = walk_source(tmp_path)
    assert [item.path for item in walk] == ["ok.md"]
    assert [item.path for item in walk.skipped] == ["passwd.md"]
    assert opened == [str(tmp_path / "ok.md")]


def test_links_to_devices_and_fifos_never_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "fifo.md").symlink_to(tmp_path / "pipe")
    (tmp_path / "zero.md").symlink_to("/dev/zero")
    (tmp_path / "null.md").symlink_to("/dev/null")
    walk = walk_source(tmp_path, follow_external_links=True)
    assert failures(walk) == {
        "fifo.md": "not a regular file",
        "null.md": "not a regular file",
        "zero.md": "not a regular file",
    }
    assert sorted(item.path for item in walk_source(tmp_path).skipped) == ["null.md", "zero.md"]


def test_hardlinks_are_two_files_with_one_hash(tmp_path: Path) -> None:
    os.link(write(tmp_path, "a.md", "# Same\n"), tmp_path / "b.md")
    files = found_files(tmp_path)
    assert sorted(files) == ["a.md", "b.md"]
    assert files["a.md"].content_hash == files["b.md"].content_hash


def test_folder_named_like_markdown_is_walked_not_yielded(tmp_path: Path) -> None:
    write(tmp_path, "x.md/inner.md")
    assert walk_paths(tmp_path) == ["x.md/inner.md"]


def test_oversize_file_is_reported_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "big.md", b"x" * 101)
    write(tmp_path, "small.md", b"y" * 100)
    bytes_read: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        bytes_read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    items = list(walk_source(tmp_path, max_bytes=100))
    assert failures(items) == {"big.md": "file is 101 bytes, over the 100-byte limit"}
    assert [item.path for item in items if isinstance(item, FoundFile)] == ["small.md"]
    assert sum(bytes_read) == 100


def test_broken_symlink_and_symlink_loop_file_are_failures(tmp_path: Path) -> None:
    write(tmp_path, "ok.md")
    (tmp_path / "gone.md").symlink_to(tmp_path / "missing.md")
    (tmp_path / "loop.md").symlink_to("loop.md")
    (tmp_path / ".hidden").symlink_to(tmp_path / "missing")
    items = list(walk_source(tmp_path))
    assert failures(items) == {"gone.md": "broken symlink", "loop.md": "symlink loop"}
    assert [item.path for item in items] == ["gone.md", "loop.md", "ok.md"]


def test_a_link_that_does_not_resolve_is_a_failure_whatever_its_name(tmp_path: Path) -> None:
    """It may have been a folder of pages: a failure keeps what is stored under its path."""
    write(tmp_path, "ok.md")
    (tmp_path / "docs").symlink_to(tmp_path / "vanished", target_is_directory=True)
    (tmp_path / "logo.png").symlink_to("missing.png")
    (tmp_path / "circle").symlink_to("circle")
    (tmp_path / "drafts").symlink_to(tmp_path / "vanished")
    items = list(walk_source(tmp_path, exclude=["drafts/**"]))
    assert failures(items) == {
        "circle": "symlink loop",
        "docs": "broken symlink",
        "logo.png": "broken symlink",
    }


def test_fifo_with_a_markdown_name_is_reported_and_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.md")
    assert failures(walk_source(tmp_path)) == {"pipe.md": "not a regular file"}


def _walk_failures_without_root_override(root: Path) -> dict[str, str]:
    """The walk's failures, run where file modes apply: as root, in a child without the
    capabilities that let root read any file."""
    script = (
        "import json, sys; from pathlib import Path; from tasks.discover import walk_source;"
        "from tasks.records import FileFailure;"
        "print(json.dumps({i.path: i.reason for i in walk_source(Path(sys.argv[1]))"
        " if isinstance(i, FileFailure)}))"
    )
    command = [sys.executable, "-c", script, str(root)]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, *command]
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=repo).stdout
    return dict(json.loads(out))


def test_a_vanished_link_out_of_the_root_is_skipped_or_with_following_a_failure(tmp_path: Path) -> None:
    root = tmp_path / "kb"
    write(root, "ok.md")
    (root / "shared").symlink_to(tmp_path / "mount" / "docs", target_is_directory=True)
    walk = walk_source(root)
    assert failures(walk) == {}
    assert [(item.path, item.reason) for item in walk.skipped] == [
        ("shared", f"symlink to {tmp_path.resolve() / 'mount' / 'docs'}, outside the source root")
    ]
    assert failures(walk_source(root, follow_external_links=True)) == {"shared": "broken symlink"}


def test_unreadable_file_and_folder_are_reported(tmp_path: Path) -> None:
    write(tmp_path, "secret.md").chmod(0)
    write(tmp_path, "locked/inner.md")
    (tmp_path / "locked").chmod(0)
    try:
        assert _walk_failures_without_root_override(tmp_path) == {
            "locked": "cannot list folder: permission denied",
            "secret.md": "permission denied",
        }
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_a_link_to_a_folder_that_became_unreadable_is_reported(tmp_path: Path) -> None:
    root, store = tmp_path / "kb", tmp_path / "kb" / ".store"
    write(store, "locked/v1/page.md")
    write(store, "shut/page.md")
    (root / "behind").symlink_to(store / "locked" / "v1", target_is_directory=True)
    (root / "shut").symlink_to(store / "shut", target_is_directory=True)
    (store / "locked").chmod(0)
    (store / "shut").chmod(0)
    try:
        assert _walk_failures_without_root_override(root) == {
            "behind": "permission denied",
            "shut": "cannot list folder: permission denied",
        }
    finally:
        (store / "locked").chmod(0o755)
        (store / "shut").chmod(0o755)


def test_a_file_name_that_is_not_utf8_is_a_failure_with_a_readable_path(tmp_path: Path) -> None:
    write(tmp_path, "ok.md")
    for raw in (b"bad\xffname.md", b"caf\xe9/page.md"):
        os.makedirs(os.path.dirname(os.fsencode(tmp_path) + b"/" + raw), exist_ok=True)
        with open(os.fsencode(tmp_path) + b"/" + raw, "wb") as bad:
            bad.write(b"# Bad\n")
    items = list(walk_source(tmp_path))
    reason = "file name is not valid UTF-8; rename the file"
    assert failures(items) == {"bad\\xffname.md": reason, "caf\\xe9/page.md": reason}
    assert [item.path for item in items if isinstance(item, FoundFile)] == ["ok.md"]
    assert all(item.path.encode("utf-8") for item in items)


def test_missing_or_non_folder_root_raises_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        walk_source(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        walk_source(write(tmp_path, "file.md"))
    with pytest.raises(GlobError):
        walk_source(tmp_path, include=["../*.md"])


def test_file_deleted_after_the_walk_raises_document_error(tmp_path: Path) -> None:
    target = write(tmp_path, "docs/gone.md")
    found = found_files(tmp_path)["docs/gone.md"]
    target.unlink()
    with pytest.raises(DocumentError) as caught:
        read_document(found)
    assert caught.value.path == "docs/gone.md"
    assert caught.value.reason == "file disappeared after the walk"


def test_read_document_hashes_what_it_reads_now(tmp_path: Path) -> None:
    target = write(tmp_path, "page.md", "# Before\n")
    found = found_files(tmp_path)["page.md"]
    target.write_text("# After\n", encoding="utf-8")
    document = read_document(found)
    assert document.title == "After"
    assert document.content_hash == sha256_bytes(b"# After\n") != found.content_hash


# --- decoding --------------------------------------------------------------


def test_bom_and_crlf_and_lone_cr_are_normalised() -> None:
    data = b"\xef\xbb\xbf---\r\ntitle: T\r\n---\r\nline one\r\nline two\rline three\n"
    document = parse_document("a.md", data)
    assert document.title == "T"
    assert document.body == "line one\nline two\nline three\n"
    assert document.content_hash == sha256_bytes(data)


def test_invalid_utf8_is_reported_with_its_offset() -> None:
    assert reason_of(b"# ok\n\xff rest") == "invalid UTF-8 at byte 5"
    assert reason_of(b"\xef\xbb\xbfab\xc3") == "invalid UTF-8 at byte 5"


def test_nul_byte_is_reported_as_binary_with_its_offset() -> None:
    assert reason_of(b"\x89PNG\r\n\x1a\n\x00\x00") == "binary file: NUL byte at offset 8"


def test_given_content_hash_is_kept() -> None:
    assert parse_document("a.md", b"# A\n", content_hash=b"h" * 32).content_hash == b"h" * 32


# --- frontmatter -----------------------------------------------------------


def test_malformed_yaml_is_reported_with_the_file_line() -> None:
    reason = reason_of(b"---\ntitle: ok\nbad: [unclosed\n---\nbody\n")
    assert reason.startswith("malformed YAML frontmatter: ")
    assert reason.endswith("at line 4")


def test_forbidden_control_character_in_yaml_is_reported_with_its_line() -> None:
    reason = reason_of(b"---\ntitle: ok\nnote: a\x01b\n---\n")
    assert reason == "malformed YAML frontmatter: character '\\x01' is not allowed at line 3"


@pytest.mark.parametrize(
    ("frontmatter", "kind"), [("- a\n- b", "list"), ("just a string", "str"), ("42", "int")]
)
def test_non_mapping_frontmatter_is_refused(frontmatter: str, kind: str) -> None:
    reason = reason_of(f"---\n{frontmatter}\n---\nbody\n".encode())
    assert reason == f"frontmatter must be a mapping of keys to values, got a {kind}"


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefg", "bcdefgh", strict=True)
)
HOSTILE_YAML = {
    "bad-date": "date: 2024-13-45",
    "bad-timestamp": "when: !!timestamp not-a-date",
    "huge-int": "big: " + "9" * 5000,
    "deep-3k": "deep: " + "[" * 3000 + "]" * 3000,
    "deep-50k": "deep: " + "[" * 50_000 + "]" * 50_000,
    "self-reference": "a: &a [*a]",
    "nul-escape": 'nul: "a\\0b"',
    "alias-bomb": ALIAS_BOMB,
    "oversize": "key: value\n" * 10_000,
}


@pytest.mark.parametrize("yaml_text", HOSTILE_YAML.values(), ids=HOSTILE_YAML.keys())
def test_hostile_yaml_raises_document_error(yaml_text: str) -> None:
    reason_of(f"---\n{yaml_text}\n---\n".encode())


def test_empty_frontmatter_and_frontmatter_only_file() -> None:
    assert parse("---\n---\nbody\n").frontmatter == {}
    document = parse("---\ntitle: Only\n---\n")
    assert (document.frontmatter, document.body, document.title) == ({"title": "Only"}, "", "Only")
    assert parse("---\ntitle: No newline\n---").body == ""
    assert parse("---\ntitle: Dots\n...\nbody\n").body == "body\n"


def test_opening_rule_without_closing_line_is_not_frontmatter() -> None:
    document = parse("---\nJust a rule, then text: with a colon\n")
    assert document.frontmatter == {}
    assert document.body == "---\nJust a rule, then text: with a colon\n"


def test_frontmatter_values_become_json_safe() -> None:
    document = parse(
        "---\n"
        "published: 2024-05-01\n"
        "updated: 2024-05-01 12:30:00+02:00\n"
        "1: numeric key\n"
        "2024-01-01: date key\n"
        "labels: !!set {b, a}\n"
        "nested: {when: [2023-12-31]}\n"
        "ratio: .nan\n"
        "---\n"
    )
    assert document.frontmatter == {
        "published": "2024-05-01",
        "updated": "2024-05-01T12:30:00+02:00",
        "1": "numeric key",
        "2024-01-01": "date key",
        "labels": ["a", "b"],
        "nested": {"when": ["2023-12-31"]},
        "ratio": "NaN",
    }


# --- fields ----------------------------------------------------------------


def test_title_prefers_frontmatter() -> None:
    assert parse("---\ntitle: '  From YAML  '\n---\n# Heading\n").title == "From YAML"
    assert parse("---\ntitle: 2024\n---\n# Heading\n").title == "2024"


def test_title_falls_back_to_first_atx_heading_without_closing_hashes() -> None:
    assert parse("intro\n\n## Second level ##\n\n# First level\n").title == "Second level"
    assert parse("#\n#no-space\n# Real\n").title == "Real"


def test_title_falls_back_to_setext_heading() -> None:
    assert parse("Setext Title\n============\n\ntext\n").title == "Setext Title"
    assert parse("Two line\nsetext\n---\n").title == "Two line setext"
    assert parse("- item\n---\n# After rule\n").title == "After rule"


def test_heading_inside_code_fence_is_ignored() -> None:
    text = "```bash\n# not a heading\n```\n~~~~\n# nor this\n~~~\n~~~~\n# Outside\n"
    assert parse(text).title == "Outside"
    assert parse("```\n# never closed\n").title == "page"


def test_heading_inside_an_html_comment_or_block_is_ignored() -> None:
    text = "<!--\n# Old title, commented out\n\n## Still a comment\n-->\n\n# Real title\n"
    assert parse(text).title == "Real title"
    assert parse("<div>\n# Inside HTML\n</div>\n\n# After\n").title == "After"
    assert parse("<!-- # not a heading -->\ntext\n").title == "page"


def test_headings_nested_in_quotes_and_lists_do_not_name_the_page() -> None:
    assert parse("> # Quoted\n\n- # Listed\n\n1. Setext in a list\n   ---\n\n# Top\n").title == "Top"


def test_the_first_heading_is_found_far_into_a_long_page() -> None:
    fence = "```\n" + "# comment in code\n" * 5000 + "```\n"
    prose = "Some text on a line.\n" * 3000
    assert parse(fence + prose + "\nLate\n====\n").title == "Late"
    assert parse(prose + "# Tail").title == "Tail"
    assert parse("# \n#\n" + prose + "## Second\n").title == "Second"


def test_title_falls_back_to_file_stem() -> None:
    assert parse("no headings here\n", path="docs/getting-started.md").title == "getting-started"
    assert parse("", path="README.markdown").title == "README"


def test_description() -> None:
    assert parse("---\ndescription: ' Short. '\n---\n").description == "Short."
    assert parse("---\ndescription: [a]\n---\n").description is None
    assert parse("# x\n").description is None


def test_namespace_from_frontmatter_or_first_folder() -> None:
    assert parse("---\nrag_namespace: ops\n---\n", path="docs/a.md").namespace == "ops"
    assert parse("# x\n", path="guides/deep/a.md").namespace == "guides"
    assert parse("# x\n", path="a.md").namespace == "default"
    assert first_folder_namespace("./docs/a.md") == "docs"
    assert first_folder_namespace("a.md") == "default"


def test_tags_and_concept_keys_as_list_or_comma_string() -> None:
    document = parse("---\ntags: [python, ' etl ', '', 3.11, python]\nconcept_keys: a, b ,,c\n---\n")
    assert document.tags == ("python", "etl", "3.11")
    assert document.concept_keys == ("a", "b", "c")
    assert parse("---\ntags: {a: 1}\n---\n").tags == ()
    assert parse("# no frontmatter\n").tags == ()


@pytest.mark.parametrize(
    ("value", "include"),
    [
        ("false", False),
        ("False", False),
        ("'no'", False),
        ("'0'", False),
        ("0", False),
        ("'FALSE'", False),
        ("true", True),
        ("'yes'", True),
        ("null", True),
    ],
)
def test_rag_include(value: str, include: bool) -> None:
    assert parse(f"---\nrag_include: {value}\n---\n").include is include


def test_missing_rag_include_means_included() -> None:
    assert parse("# x\n").include is True


# --- properties ------------------------------------------------------------

yaml_ish_text = st.text(alphabet=st.sampled_from(list("-:[]{}&*!|>'\"%@`#,?~=<\\ \n\tab01.é\x01")))
markdown_ish_text = st.text(alphabet=st.sampled_from(list("#=-`~ \n\r\tab1*_>")))


def parses_or_refuses(data: bytes) -> None:
    try:
        document = parse_document("p/x.md", data)
    except DocumentError as error:
        assert error.path == "p/x.md"
        return
    assert isinstance(document, ParsedDocument)
    assert "\r" not in document.body


property_settings = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(120)
@property_settings
@given(st.binary())
def test_any_bytes_parse_or_raise_document_error(data: bytes) -> None:
    parses_or_refuses(data)


@pytest.mark.timeout(120)
@property_settings
@given(frontmatter=yaml_ish_text | st.text(), body=markdown_ish_text | st.text(), closing=st.booleans())
def test_any_text_with_frontmatter_parses_or_raises_document_error(
    frontmatter: str, body: str, closing: bool
) -> None:
    opening = "---\n" + frontmatter + ("\n---\n" if closing else "\n")
    parses_or_refuses((opening + body).encode("utf-8", "surrogatepass"))
    parses_or_refuses(body.encode("utf-8", "surrogatepass"))


@pytest.mark.timeout(120)
@property_settings
@given(st.lists(st.sampled_from(["a", "b", "*", "**", "?", "[a-b]", "[!a]", ".md"]), max_size=6))
def test_compiled_globs_never_match_across_folders_with_one_star(pieces: list[str]) -> None:
    pattern = "".join(pieces) or "x"
    matches = compile_globs([pattern])
    if "**" not in pattern:
        assert not any(matches(path) for path in ["a/b", "a/a.md", "b/.md"])


heading_ish_lines = st.lists(
    st.sampled_from(
        [
            "# Alpha beta gamma",
            "## B ##",
            "#",
            "Setext title words",
            "===",
            "---",
            "```",
            "~~~",
            "<!--",
            "-->",
            "<div>",
            "",
            "> # Q",
            "- item",
            "    # code",
            "| a | b |",
            "|---|---|",
            "1. one",
            "text",
        ]
    ),
    max_size=40,
)


def first_heading_of_a_full_parse(body: str) -> str | None:
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open" and opening.level == 0 and inline.content.split():
            return " ".join(inline.content.split())
    return None


@pytest.mark.timeout(120)
@property_settings
@given(heading_ish_lines, st.integers(min_value=0, max_value=3))
def test_first_heading_agrees_with_a_parse_of_the_whole_page(lines: list[str], padding: int) -> None:
    body = "\n".join(lines) + "\n" * padding
    assert first_heading(body) == first_heading_of_a_full_parse(body)


# --- real corpus -----------------------------------------------------------


def read_all(found: list[FoundFile]) -> tuple[list[ParsedDocument], dict[str, str]]:
    documents: list[ParsedDocument] = []
    refused: dict[str, str] = {}
    for item in found:
        try:
            documents.append(read_document(item))
        except DocumentError as error:
            refused[error.path] = error.reason
    return documents, refused


@pytest.mark.corpus
def test_prefect_docs_corpus_walks_and_parses() -> None:
    corpus = CORPORA / "prefect-docs"
    if not corpus.is_dir():
        pytest.skip(f"corpus not present at {corpus}")
    items = list(walk_source(corpus, include=DEFAULT_INCLUDE))
    found = [item for item in items if isinstance(item, FoundFile)]
    assert 900 <= len(found) <= 1100
    assert failures(items) == {}
    documents, refused = read_all(found)
    for path, reason in refused.items():
        print(f"refused {path}: {reason}")
    assert len(refused) <= len(found) // 100
    walk_hashes = {item.path: item.content_hash for item in found}
    assert all(document.content_hash == walk_hashes[document.path] for document in documents)
    assert all(document.title for document in documents)
