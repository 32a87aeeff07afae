"""Commands that need no model never import one: checked in a child process, at its exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.ingest import run_ingest
from tasks.embed import SentenceTransformerEmbedder
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "knowledge"
HEAVY = ("torch", "sentence_transformers", "transformers", "prefect")

# Runs the CLI, then, whatever the exit, reports on stderr which heavy modules were imported.
PROBE = """
import atexit, json, sys
heavy = {heavy!r}
report = lambda: print("IMPORTED " + json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)
atexit.register(report)
from cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("all-MiniLM-L6-v2", 384)


@pytest.fixture
def loaded(database_url: str, minilm: SentenceTransformerEmbedder) -> str:
    """A database holding the sample folder, embedded with the CLI's default model."""
    settings = make_settings(
        database_url,
        embedding_provider="sentence-transformers",
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
    )
    run_ingest(settings, SAMPLES, embedder_factory=lambda model, s: minilm)
    return database_url


def heavy_imports(args: list[str], database_url: str) -> list[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED ")]
    imported: list[str] = json.loads(line.removeprefix("IMPORTED "))
    return imported


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["status"],
        ["models", "list"],
        ["search", "--mode", "lexical", "rollback"],
        ["ingest", str(SAMPLES), "--no-prefect"],
    ],
    ids=["help", "status", "models-list", "lexical-search", "no-change-ingest"],
)
def test_commands_that_need_no_model_never_import_torch(loaded: str, args: list[str]) -> None:
    imported = heavy_imports(args, loaded)
    assert [name for name in imported if name != "prefect"] == []
    if args[0] in ("--help", "ingest"):  # a run without Prefect never imports it either
        assert "prefect" not in imported


def test_the_probe_sees_an_import_of_torch(loaded: str) -> None:
    """The check above can fail: a command that embeds does import torch."""
    assert "torch" in heavy_imports(["search", "--mode", "vector", "rollback"], loaded)
