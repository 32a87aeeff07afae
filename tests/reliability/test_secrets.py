"""Secrets: the OpenAI API key never appears in logs, error messages, summaries or the database.

One test collects everything a user or an operator could read after runs that
succeed with retries and runs that fail (a refused key, an outage), through the
real command line and in-process with every logger at DEBUG, then greps it all.
"""

from __future__ import annotations

import json
import logging
import random
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from flows.backfill import run_backfill
from flows.ingest import run_ingest
from flows.params import ParameterError, checked_overrides
from tasks.db import Connection
from tests.conftest import make_settings
from tests.fake_openai import FakeEmbeddingsServer, Fault
from tests.reliability.harness import Corpus, error_line, run_cli, worker_env
from tests.reliability.report import CaseFigures

SCENARIO = "Secrets"
SOURCE = "kb"


def new_key(rng: random.Random) -> str:
    return "sk-proj-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(48))


def exception_text(exc: BaseException) -> str:
    """Everything an exception can show: message, repr, the formatted chain, and its hidden context."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(getattr(current, "args", ()))]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def leaks(secret: str, text: str) -> list[str]:
    """The secret, or a long piece of it (a masked key may show its last 4 characters, no more)."""
    pieces = [secret, secret[8:-4], secret[-16:]]
    return [piece for piece in pieces if piece in text]


def test_the_api_key_never_appears_in_logs_messages_summaries_or_the_database(
    database_url: str,
    conn: Connection,
    tmp_path: Path,
    rng: random.Random,
    figures: CaseFigures,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret, wrong_secret = new_key(rng), new_key(rng)
    corpus = Corpus(tmp_path / "kb", files=8, sections=3).write()
    seen: dict[str, str] = {}
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "tasks", "flows"):
        logging.getLogger(name).setLevel(logging.DEBUG)

    with FakeEmbeddingsServer(dimensions=64, required_api_key=secret) as server:

        def env(key: str, **extra: str) -> dict[str, str]:
            return worker_env(
                database_url,
                f"reliability-secrets-{tmp_path.name}",
                EMBEDDING_PROVIDER="openai",
                EMBEDDING_MODEL="text-embedding-3-small",
                EMBEDDING_DIMENSIONS="64",
                OPENAI_API_KEY=key,
                OPENAI_BASE_URL=server.base_url,
                RAGINGEST_EMBED_MAX_BACKOFF_SECONDS="0.05",
                RAGINGEST_EMBED_BATCH_INPUTS="4",
                **extra,
            )

        ingest = ["ingest", str(corpus.root), "--source-name", SOURCE, "--no-prefect"]
        # The real entry point, a run with retries (429, 5xx), the JSON summary on stdout.
        server.script(
            [Fault.rate_limit(retry_after=0.01), Fault.server_error(502), None, Fault.server_error(500)]
        )
        code, seen["cli ingest with retries"] = run_cli(
            [*ingest, "--json"], env(secret), tmp_path / "ok.log", fork=False
        )
        assert code == 0, seen["cli ingest with retries"]
        assert "attempt 1 of" in seen["cli ingest with retries"]
        # A refused key, in a forked worker.
        corpus.bump(rng, 0.5)
        code, seen["cli ingest with a refused key"] = run_cli(ingest, env(wrong_secret), tmp_path / "401.log")
        assert code == 1 and "refused the request with 401" in error_line(
            seen["cli ingest with a refused key"]
        )
        figures.messages.append(error_line(seen["cli ingest with a refused key"]))
        backfill = [
            "backfill",
            "--provider",
            "openai",
            "--model",
            "text-embedding-3-small",
            "--dimensions",
            "32",
            "--no-prefect",
        ]
        code, seen["cli backfill with a refused key"] = run_cli(
            backfill, env(wrong_secret), tmp_path / "bf.log"
        )
        assert code == 1, seen["cli backfill with a refused key"]
        # An outage, retried until the attempts run out.
        server.down()
        code, seen["cli ingest during an outage"] = run_cli(
            ingest, env(secret, RAGINGEST_EMBED_MAX_ATTEMPTS="3"), tmp_path / "down.log"
        )
        assert code == 1
        server.up()
        figures.runs += 4

        # In-process, every logger at DEBUG: retries, a timeout, a refused key, the summary.
        def api_settings(key: str, **extra: Any) -> Any:
            return make_settings(
                database_url,
                embedding_provider="openai",
                embedding_model="text-embedding-3-small",
                embedding_dimensions=64,
                openai_api_key=key,
                openai_base_url=server.base_url,
                embed_batch_inputs=4,
                embed_max_backoff_seconds=0.05,
                **extra,
            )

        server.script([Fault.rate_limit(retry_after=0.01), Fault.timeout(hold_seconds=1.0)])
        summary = run_ingest(api_settings(secret, embed_timeout_seconds=0.3), corpus.root, source_name=SOURCE)
        assert summary["embeddings"]["retries"] >= 2
        seen["summary"] = json.dumps(summary)
        corpus.bump(rng, 0.5)
        wrong = api_settings(wrong_secret)
        failures: list[BaseException] = []
        attempts: list[Callable[[], object]] = [
            lambda: run_ingest(wrong, corpus.root, source_name=SOURCE),
            lambda: run_backfill(wrong, provider="openai", model="text-embedding-3-small", dimensions=32),
            lambda: checked_overrides({"openai_api_key": secret}),
        ]
        for attempt in attempts:
            with pytest.raises(Exception) as raised:
                attempt()
            failures.append(raised.value)
        figures.runs += 3
        assert isinstance(failures[-1], ParameterError)
        seen["exceptions"] = "\n".join(exception_text(exc) for exc in failures)
        seen["settings"] = f"{wrong!r} {wrong} {wrong.model_dump()} {wrong.model_dump_json()}"
        seen["python logging"] = caplog.text + "\n".join(repr(record.__dict__) for record in caplog.records)
        assert server.texts_embedded > 0 and any(r.status == 401 for r in server.requests)

    seen["database"] = "\n".join(
        str(row)
        for table in ("ingest_runs", "ingest_failures", "embedding_models", "documents")
        for row in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table)))
    )
    assert "refused the request with 401" in seen["exceptions"]
    assert seen["database"] and any(record.name.startswith(("openai", "httpx")) for record in caplog.records)
    figures.faults += sum(1 for record in server.requests if record.status != 200)
    figures.notes.append(
        f"{sum(len(text) for text in seen.values())} characters of output grepped from {len(seen)} places"
    )
    found = {
        place: leaks(key, text)
        for place, text in seen.items()
        for key in (secret, wrong_secret)
        if leaks(key, text)
    }
    assert found == {}, f"the API key leaked into {sorted(found)}"


# --- a malformed DATABASE_URL -------------------------------------------------------------------

PASSWORD = "Pw-8f3kq2Lx9"
MALFORMED_URLS = {
    "a SQLAlchemy driver in the scheme": f"postgresql+psycopg://ragingest:{PASSWORD}@127.0.0.1:5432/kb",
    "no scheme": f"ragingest:{PASSWORD}@127.0.0.1:5432/kb",
    "a space in the password": f"postgresql://ragingest:{PASSWORD} x@127.0.0.1:5432/kb",
    "an unclosed IPv6 host": f"postgresql://ragingest:{PASSWORD}@[::1/kb",
    "a key=value string with a bad key": f"host=127.0.0.1 password={PASSWORD} frobnicate=1",
    "nothing listening": f"postgresql://ragingest:{PASSWORD}@127.0.0.1:1/kb?connect_timeout=2",
}


@pytest.mark.parametrize("form", list(MALFORMED_URLS))
def test_a_malformed_database_url_never_prints_its_password(
    form: str, tmp_path: Path, figures: CaseFigures
) -> None:
    from config.settings import load_settings
    from tasks.db import DatabaseConnectionError, connect, connect_migrated, database_url

    url = MALFORMED_URLS[form]
    figures.bad_inputs += 1
    seen: dict[str, str] = {}
    attempts: dict[str, Callable[[], object]] = {
        "database_url": lambda: connect(database_url(load_settings(database_url=url))),
        "connect": lambda: connect(url),
        "connect_migrated": lambda: connect_migrated(url),
    }
    for name, attempt in attempts.items():
        with pytest.raises(DatabaseConnectionError) as raised:
            attempt()
        seen[name] = exception_text(raised.value)
        assert "***" in str(raised.value) or "password" not in url, str(raised.value)
        assert raised.value.url is not None and PASSWORD not in raised.value.url

    env = worker_env(url, f"reliability-url-{tmp_path.name}", EMBEDDING_PROVIDER="hash")
    (tmp_path / "kb").mkdir()
    for command in (["status"], ["ingest", str(tmp_path / "kb"), "--no-prefect"]):
        figures.runs += 1
        code, seen[" ".join(command)] = run_cli(command, env, tmp_path / f"{command[0]}.log")
        assert code == 1, seen[" ".join(command)]
        message = error_line(seen[" ".join(command)])
        assert "DATABASE_URL" in message, message
        figures.messages.append(message)
    leaked = [place for place, text in seen.items() if PASSWORD in text]
    assert leaked == [], f"the password leaked into {leaked}: {seen}"
