"""Figures the reliability tests record as they run, and the REPORT.md table made from them.

Every number comes from what a test actually did: a kill counts when it landed,
a bad input when it was fed to the pipeline, a row as lost when a check found
it missing after the recovery run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPORT_PATH = Path(__file__).resolve().parent / "REPORT.md"
SEED = int(os.environ.get("RAGINGEST_RELIABILITY_SEED", "7406"))
"""Seeds every random choice of the suite (kill points, faults, edits); set it to explore others."""


@dataclass
class CaseFigures:
    """What one test did. Tests add to these counters; the outcome is filled in by the conftest."""

    scenario: str
    case: str
    runs: int = 0
    """Pipeline runs started (CLI workers and in-process runs)."""
    kills: int = 0
    """SIGKILLs that landed in the stage they aimed at."""
    kills_survived: int = 0
    """Kills after which the rerun completed and every invariant held."""
    faults: int = 0
    """Faults injected other than kills: API errors, dropped connections, held locks."""
    bad_inputs: int = 0
    """Hostile or malformed inputs fed to the pipeline."""
    rows_checked: int = 0
    """Chunk rows whose presence a check verified against the files."""
    rows_lost: int = 0
    seconds: float = 0.0
    outcome: str = "not run"
    xfail_reason: str = ""
    notes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    """Error messages a failing run printed, shown in the report as users would read them."""


@dataclass
class ScenarioTotals:
    scenario: str
    tests: int = 0
    passed: int = 0
    xfailed: int = 0
    failed: int = 0
    runs: int = 0
    kills: int = 0
    kills_survived: int = 0
    faults: int = 0
    bad_inputs: int = 0
    rows_checked: int = 0
    rows_lost: int = 0
    seconds: float = 0.0

    def add(self, case: CaseFigures) -> None:
        self.tests += 1
        self.passed += case.outcome == "passed"
        self.xfailed += case.outcome == "xfailed"
        self.failed += case.outcome in ("failed", "error", "xpassed")
        for name in ("runs", "kills", "kills_survived", "faults", "bad_inputs", "rows_checked", "rows_lost"):
            setattr(self, name, getattr(self, name) + getattr(case, name))
        self.seconds += case.seconds


def totals_by_scenario(cases: Iterable[CaseFigures]) -> list[ScenarioTotals]:
    totals: dict[str, ScenarioTotals] = {}
    for case in cases:
        totals.setdefault(case.scenario, ScenarioTotals(case.scenario)).add(case)
    return list(totals.values())


def render_report(cases: list[CaseFigures], *, selected: int, seed: int, seconds: float) -> str:
    rows = totals_by_scenario(cases)
    grand = ScenarioTotals("**total**")
    for case in cases:
        grand.add(case)
    lines = [
        "# Reliability report",
        "",
        "Written by `tests/reliability` at the end of a full run of the suite",
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, seed {seed}, {len(cases)} of {selected} tests run,"
        f" {seconds:.0f} s). Every figure is counted from what the tests did in that run;",
        "a run is one pipeline run (a CLI worker or an in-process ingest or backfill), and rows",
        "checked counts the chunk rows found present after recovery, once per check.",
        "",
        "| scenario | tests | passed | xfail | failed | runs | kills survived | faults injected"
        " | bad inputs | rows checked | rows lost | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [*rows, grand]:
        lines.append(
            f"| {row.scenario} | {row.tests} | {row.passed} | {row.xfailed} | {row.failed} | {row.runs}"
            f" | {row.kills_survived}/{row.kills} | {row.faults} | {row.bad_inputs} | {row.rows_checked}"
            f" | {row.rows_lost} | {row.seconds:.0f} |"
        )
    notes = [(case.case, note) for case in cases for note in case.notes]
    xfails = [case for case in cases if case.outcome in ("xfailed", "failed", "error", "xpassed")]
    if xfails:
        lines += ["", "Tests not passing:", ""]
        lines += [
            f"- `{case.case}`: {case.outcome}" + (f" ({case.xfail_reason})" if case.xfail_reason else "")
            for case in xfails
        ]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- `{case}`: {note}" for case, note in notes]
    messages = dict.fromkeys(message for case in cases for message in case.messages)
    if messages:
        lines += ["", "Failure messages printed by the runs that failed on purpose:", ""]
        lines += [f"- `{message}`" for message in messages]
    return "\n".join(lines) + "\n"
