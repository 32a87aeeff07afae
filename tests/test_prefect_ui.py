"""The Prefect UI's run form, in a real browser: Debian's chromium driven by playwright, against
a real `prefect server start` holding the deployments of prefect.yaml.

The form is drawn from each deployment's parameter schema. A choice must show as a dropdown
holding its default (not as a `str | None` switch set to "None"), and a run submitted from
the form must reach the server with the values chosen, then complete on a process worker.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.db import Connection
from tests.fix_prefect import BIN, RUN_SECONDS, PrefectServer, background, call, deployment, tail
from tests.test_ingest import PAGES, write_tree

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FORM_SECONDS = 60.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.prefect,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)"
    ),
]

# Every choice of every deployment, with the default its dropdown must show.
CHOICES = {
    "ingest/nightly-ingest": {
        "profile": "environment",
        "chunker": "environment",
        "provider": "environment",
        "index_strategy": "environment",
    },
    "bulk-load/bulk-load": {"profile": "environment", "chunker": "environment", "provider": "environment"},
    "backfill/backfill-model": {"profile": "environment", "precision": "auto", "provider": ""},
    "evaluate/evaluate": {"profile": "environment"},
}


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A page of a fresh chromium profile."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context.set_default_timeout(FORM_SECONDS * 1000)
        try:
            yield context.new_page()
        finally:
            context.close()


def open_run_form(page: Any, server: PrefectServer, name: str) -> Any:
    page.goto(f"{server.ui_url}/deployments/deployment/{deployment(server, name).id}/run")
    page.get_by_text("Parameters", exact=True).wait_for()
    return page


def form_field(page: Any, name: str) -> Any:
    """The block of the form that holds parameter `name` (its label, switch and input)."""
    label = page.locator(".schema-form-property__label").filter(
        has_text=re.compile(rf"^{name}( \(Optional\))?$")
    )
    return page.locator(".schema-form-property").filter(has=label).last


def choose(page: Any, name: str, value: str) -> None:
    field = form_field(page, name)
    field.locator(".p-select-button__control").click()
    page.keyboard.press("ArrowDown")  # opens the options
    page.locator(".p-select-option", has_text=value).first.click()
    assert field.locator(".p-select-button__value").inner_text() == value


@pytest.mark.parametrize("name", list(CHOICES))
def test_every_choice_shows_as_a_dropdown_with_its_default(
    deployed: PrefectServer, browser_page: Any, name: str
) -> None:
    page = open_run_form(browser_page, deployed, name)
    for field_name, default in CHOICES[name].items():
        field = form_field(page, field_name)
        assert field.locator(".p-select-button__control").count() == 1, (name, field_name, field.inner_text())
        shown = field.locator(".p-select-button__value")
        assert (shown.inner_text() if shown.count() else "") == default, (name, field_name)
        assert 'Property is type "None"' not in field.inner_text(), (name, field_name)


def test_a_run_submitted_from_the_form_is_created_with_its_values_and_completes(
    deployed: PrefectServer, browser_page: Any, database_url: str, conn: Connection, tmp_path: Path
) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    kb = write_tree(tmp_path / "kb", dict(PAGES))
    page = open_run_form(browser_page, deployed, "bulk-load/bulk-load")
    form_field(page, "source").locator("input, textarea").first.fill(str(kb))
    choose(page, "chunker", "tokens")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/deployment/*?tab=Runs")

    target = deployment(deployed, "bulk-load/bulk-load")
    only_bulk = DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
    runs = call(deployed, lambda client: client.read_flow_runs(deployment_filter=only_bulk))
    (run,) = [r for r in runs if r.parameters.get("source") == str(kb)]
    assert run.parameters["chunker"] == "tokens"
    assert run.parameters.get("profile", "environment") == "environment"
    assert run.parameters.get("provider", "environment") == "environment"
    assert run.parameters.get("settings_overrides") is None

    log = tmp_path / "worker.log"
    env = deployed.env(
        DATABASE_URL=database_url,
        EMBEDDING_PROVIDER="hash",
        EMBEDDING_MODEL="test",
        EMBEDDING_DIMENSIONS="64",
    )
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "ragingest", "--run-once"]
    with background(command, env, log) as worker:
        try:
            worker.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {RUN_SECONDS:.0f} s:\n{tail(log)}")
    finished = call(deployed, lambda client: client.read_flow_run(run.id))
    assert finished.state.is_completed(), f"{finished.state}\n{tail(log)}"
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (4,)
