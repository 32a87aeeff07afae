"""Markers, the figures each test records, and REPORT.md written when the whole suite has run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.db import Connection, connect
from tests.reliability.report import REPORT_PATH, SEED, CaseFigures, render_report

HERE = Path(__file__).resolve().parent

_cases: dict[str, CaseFigures] = {}
_selected: set[str] = set()
_selected_modules: set[str] = set()
_deselected: set[Path] = set()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability_long: a long fault-injection test (kill -9 loops); runs by default"
    )


def _ours(items: list[pytest.Item]) -> set[Path]:
    return {item.path for item in items if item.path.is_relative_to(HERE)}


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.update(_ours(items))


def pytest_collection_finish(session: pytest.Session) -> None:
    _selected.update(item.nodeid for item in session.items if item.path.is_relative_to(HERE))
    _selected_modules.update(path.name for path in _ours(session.items))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    case = _cases.get(item.nodeid)
    if case is None:
        return report
    case.seconds += report.duration
    if report.when == "call" or (report.when == "setup" and not report.passed):
        case.outcome = _outcome(report)
        case.xfail_reason = getattr(report, "wasxfail", "")
    return report


def _outcome(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when != "call" and report.failed:
        return "error"
    return report.outcome


@pytest.fixture(autouse=True)
def figures(request: pytest.FixtureRequest) -> CaseFigures:
    """The counters of this test, under its module's SCENARIO name (every test gets a row)."""
    scenario = getattr(request.module, "SCENARIO", request.module.__name__)
    case = CaseFigures(scenario=scenario, case=request.node.name)
    _cases[request.node.nodeid] = case
    return case


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source seeded by the suite seed and the test's name: reproducible per test."""
    return random.Random(f"{SEED}:{request.node.name}")


@pytest.fixture
def monitor(database_url: str) -> Iterator[Connection]:
    """A second connection that watches the workers through pg_stat_activity."""
    with connect(database_url) as connection:
        yield connection


def _whole_suite_ran() -> bool:
    """REPORT.md speaks for the suite: a run of a part of it (a file, -k, -m) leaves it alone."""
    modules = {path.name for path in HERE.glob("test_*.py")}
    return bool(_cases) and not _deselected and modules <= _selected_modules


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _whole_suite_ran():
        return
    cases = list(_cases.values())
    seconds = sum(case.seconds for case in cases)
    REPORT_PATH.write_text(render_report(cases, selected=len(_selected), seed=SEED, seconds=seconds))
