"""Rebuild the docs-qa corpus as a Markdown tree, and write its evaluation cases.

The corpus (`shared/corpora/docs-qa`) holds scraped documentation pages as chunks
(`chunk_link` = `page#anchor`, `chunk_heading`, `text`) and 100 questions
labelled with the chunk links that answer them. This script writes:

- one Markdown file per page, with the page's URL and a title in the
  frontmatter and one `## heading` section per chunk, in corpus order;
- one JSON line per question: `id`, `query`, and for each labelled chunk its
  page's path in the tree (`expected_paths`) and its heading
  (`expected_headings`, paired by position).

Usage:
    python -m eval.docsqa tree build/docsqa     # the Markdown tree
    python -m eval.docsqa cases eval/docsqa_cases.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from markdown_it import MarkdownIt

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "docs-qa"
DOCS_FILE = "data/anthropic_docs.json"
QUESTIONS_FILE = "evaluation/docs_evaluation_dataset.json"
DEFAULT_CASES = Path(__file__).resolve().parent / "docsqa_cases.jsonl"

_ACRONYMS = {"api": "API", "ip": "IP", "sdks": "SDKs", "xml": "XML", "ai": "AI", "llm": "LLM"}


@dataclass(frozen=True, slots=True)
class Section:
    link: str
    heading: str
    text: str


@dataclass(frozen=True, slots=True)
class Page:
    url: str
    path: str
    """Relative path of the page's Markdown file in the tree."""
    title: str
    sections: tuple[Section, ...]


# --- reading the corpus -----------------------------------------------------------


def load_sections(corpus: Path = CORPUS) -> list[Section]:
    raw = json.loads((corpus / DOCS_FILE).read_text(encoding="utf-8"))
    return [Section(item["chunk_link"], item["chunk_heading"], item["text"]) for item in raw]


def load_questions(corpus: Path = CORPUS) -> list[dict[str, Any]]:
    questions: list[dict[str, Any]] = json.loads((corpus / QUESTIONS_FILE).read_text(encoding="utf-8"))
    return questions


def page_url(link: str) -> str:
    return link.partition("#")[0]


def group_pages(sections: Sequence[Section]) -> list[Page]:
    """Sections grouped by page, pages and sections in corpus order."""
    by_url: dict[str, list[Section]] = {}
    for section in sections:
        by_url.setdefault(page_url(section.link), []).append(section)
    paths = page_paths(list(by_url))
    return [Page(url, paths[url], page_title(paths[url]), tuple(members)) for url, members in by_url.items()]


def page_paths(urls: Sequence[str]) -> dict[str, str]:
    """URL -> file path: the URL path less the folders every page shares, plus `.md`.

    A page whose path is also the folder of other pages becomes that folder's `index.md`.
    """
    parts = {url: PurePosixPath(urlsplit(url).path.strip("/")).parts for url in urls}
    shared = _common_prefix(list(parts.values()))
    relative = {url: p[shared:] for url, p in parts.items()}
    folders = {p[:i] for p in relative.values() for i in range(1, len(p))}
    return {
        url: "/".join(p + ("index",) if p in folders or not p else p) + ".md" for url, p in relative.items()
    }


def _common_prefix(paths: Sequence[tuple[str, ...]]) -> int:
    if not paths:
        return 0
    length = 0
    # Keep at least one part of the shortest path: that part names the page.
    while length < min(len(p) for p in paths) - 1 and len({p[length] for p in paths}) == 1:
        length += 1
    return length


def page_title(path: str) -> str:
    """A readable title from the file name (its folder for an index page)."""
    stem = PurePosixPath(path)
    name = stem.parent.name if stem.stem == "index" else stem.stem
    words = [_ACRONYMS.get(word, word) for word in name.split("-")]
    title = " ".join(words)
    return title[:1].upper() + title[1:]


# --- writing Markdown -------------------------------------------------------------


def section_body(section: Section) -> str:
    """The chunk's text less its leading heading line, with stray headings made plain text.

    A chunk that holds nothing but its heading keeps the heading as its text, as the
    corpus has it, so every labelled chunk has a chunk in the tree.
    """
    text = section.text.replace("\r\n", "\n").strip("\n")
    first, _, rest = text.partition("\n")
    body = rest.strip("\n") if first.strip() == section.heading.strip() else text
    return demote_headings(body or text)


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table").disable("inline")


def demote_headings(body: str) -> str:
    """Text whose top-level ATX and setext headings are escaped, so the section stays one section."""
    lines = body.split("\n")
    for token in _parser().parse(body):
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        start, end = token.map
        if token.markup.startswith("#"):
            lines[start] = re.sub(r"^( {0,3})#", r"\1\\#", lines[start])
        else:  # setext: the underline becomes a paragraph of its own
            lines[end - 1] = "\\" + lines[end - 1].lstrip()
    return "\n".join(lines)


def render_page(page: Page) -> str:
    frontmatter = yaml.safe_dump(
        {"title": page.title, "source_url": page.url}, sort_keys=False, allow_unicode=True
    )
    parts = [f"---\n{frontmatter}---\n"]
    for section in page.sections:
        parts.append(f"## {section.heading}\n\n{section_body(section)}\n")
    return "\n".join(parts)


def write_tree(out: Path, pages: Iterable[Page]) -> list[Path]:
    """Write one Markdown file per page under `out`; returns the files written."""
    written = []
    for page in pages:
        target = out / page.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render_page(page), encoding="utf-8")
        written.append(target)
    return written


# --- cases -----------------------------------------------------------------------


def build_cases(questions: Sequence[Mapping[str, Any]], pages: Sequence[Page]) -> list[dict[str, Any]]:
    """One case per question; each labelled chunk becomes a (path, heading) pair."""
    where = {s.link: (page.path, s.heading) for page in pages for s in page.sections}
    cases = []
    for question in questions:
        missing = [link for link in question["correct_chunks"] if link not in where]
        if missing:
            raise ValueError(f"question {question['id']} names chunks not in the corpus: {missing}")
        targets = [where[link] for link in question["correct_chunks"]]
        cases.append(
            {
                "id": question["id"],
                "query": question["question"],
                "expected_paths": [path for path, _ in targets],
                "expected_headings": [heading for _, heading in targets],
            }
        )
    return cases


def cases_jsonl(cases: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(case, ensure_ascii=False) + "\n" for case in cases)


# --- command line ----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.docsqa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the docs-qa folder")
    commands = parser.add_subparsers(dest="command", required=True)
    tree = commands.add_parser("tree", help="write the Markdown tree")
    tree.add_argument("out", type=Path)
    cases = commands.add_parser("cases", help="write the cases file (JSON lines)")
    cases.add_argument("out", type=Path, nargs="?", default=DEFAULT_CASES)
    args = parser.parse_args(argv)

    pages = group_pages(load_sections(args.corpus))
    if args.command == "tree":
        written = write_tree(args.out, pages)
        print(f"wrote {len(written)} pages, {sum(len(p.sections) for p in pages)} sections to {args.out}")
    else:
        built = build_cases(load_questions(args.corpus), pages)
        args.out.write_text(cases_jsonl(built), encoding="utf-8")
        print(f"wrote {len(built)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
