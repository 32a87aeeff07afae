"""Markdown block structure for the chunker: a faster markdown-it block parser and fence lines.

`block_parser()` gives the same block tokens as
`MarkdownIt("commonmark").enable("table").disable("inline")`, only sooner:
markdown-it tries every block rule on every line (and every terminator rule on
every paragraph line), though most rules can only match a line that starts with
one particular character. The parser here looks at that character first and
calls only the rules that could match, in markdown-it's own order, so the
rules that do run decide exactly as before.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.ruler import Rule, Ruler
from markdown_it.rules_block import StateBlock

BlockRule = Callable[[StateBlock, int, int, bool], bool]

BARE_FENCE = re.compile(r"[ \t>]*(`{3,}|~{3,})\s*")
"""A line that is only a fence delimiter, after any indentation and block-quote markers."""

_FIRST_CHARACTERS = {
    "fence": "`~",
    "blockquote": ">",
    "hr": "*-_",
    "list": "*-+0123456789",
    "reference": "[",
    "html_block": "<",
    "heading": "#",
}
"""The characters a line must start with (after its indentation) for the rule to match it."""

_TABLE_DELIMITER_START = "|-:"


def closes_fence(line: str, markup: str) -> bool:
    """Whether `line` is a bare fence line that closes a fence opened with `markup`."""
    bare = BARE_FENCE.fullmatch(line)
    return bare is not None and bare.group(1)[0] == markup[0] and len(bare.group(1)) >= len(markup)


@lru_cache(maxsize=1)
def block_parser() -> MarkdownIt:
    """CommonMark with tables, block rules only, dispatched on each line's first character."""
    parser = MarkdownIt("commonmark").enable("table").disable(["inline", "text_join"])
    parser.block.ruler = _DispatchingRuler(parser.block.ruler)
    return parser


class _DispatchingRuler(Ruler[BlockRule]):
    """The block rules of `source`; each chain is one rule that picks the rules to try."""

    def __init__(self, source: Ruler[BlockRule]) -> None:
        super().__init__()
        self.__rules__: list[Rule[BlockRule]] = list(source.__rules__)
        self._chains: dict[str, list[BlockRule]] = {}

    def getRules(self, chainName: str = "") -> list[BlockRule]:  # noqa: N802, N803 (markdown-it's names)
        chain = self._chains.get(chainName)
        if chain is None:
            rules = [
                rule for rule in self.__rules__ if rule.enabled and (not chainName or chainName in rule.alt)
            ]
            chain = self._chains[chainName] = [_dispatcher(rules)] if rules else []
        return chain


def _dispatcher(rules: list[Rule[BlockRule]]) -> BlockRule:
    """One block rule that tries, in order, only those of `rules` that could match the line."""
    every = tuple(rule.fn for rule in rules)
    code = tuple(rule.fn for rule in rules if rule.name == "code")
    table = next((rule.fn for rule in rules if rule.name == "table"), None)
    by_character: dict[str, tuple[BlockRule, ...]] = {}

    def rules_for(character: str) -> tuple[BlockRule, ...]:
        found = by_character.get(character)
        if found is None:
            found = by_character[character] = tuple(
                rule.fn for rule in rules if rule.name != "table" and _may_start(rule.name, character)
            )
        return found

    def dispatch(state: StateBlock, line: int, end: int, silent: bool) -> bool:
        start = state.bMarks[line] + state.tShift[line]
        if start >= state.eMarks[line]:
            candidates = every  # a blank line: let every rule decide, as markdown-it does
        elif state.sCount[line] - state.blkIndent >= 4:
            candidates = code  # indented code: every other rule refuses it
        else:
            if table is not None and _may_be_table(state, line, end) and table(state, line, end, silent):
                return True
            candidates = rules_for(state.src[start])
        return any(rule(state, line, end, silent) for rule in candidates)

    return dispatch


def _may_start(name: str, character: str) -> bool:
    first = _FIRST_CHARACTERS.get(name)
    return name != "code" and (first is None or character in first)


def _may_be_table(state: StateBlock, line: int, end: int) -> bool:
    """The table rule's own first test: the next line starts like a delimiter row."""
    if line + 2 > end:
        return False
    start = state.bMarks[line + 1] + state.tShift[line + 1]
    return start < state.eMarks[line + 1] and state.src[start] in _TABLE_DELIMITER_START
