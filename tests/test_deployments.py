"""Deployments through a real `prefect server start`: prefect.yaml, a process worker, `ragingest serve`.

Also the pieces the deployments rely on: typed parameters refused by the server,
stage retries by SQLSTATE, and embedding calls under Prefect global limits.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pydantic
import pytest
from psycopg import sql

from flows.deployments import read_deployment_specs, served_deployment, with_schedule
from flows.ingest import bulk_load, ingest
from flows.params import (
    SECRET_SETTINGS,
    WORKER_ONLY_SETTINGS,
    ParameterError,
    SettingsOverrides,
    checked_overrides,
    existing_folder,
    run_settings,
)
from tasks.db import Connection, connect
from tasks.embed import EmbedItem, EmbedPolicy, HashEmbedder, Vectors, embed_items
from tasks.errors import is_transient
from tests.fix_prefect import (
    BIN,
    RUN_SECONDS,
    PrefectServer,
    api,
    background,
    call,
    deployment,
    everything_stored,
    run_artifacts,
    run_logs,
    start_run,
    tail,
    wait_for_final_state,
)
from tests.test_ingest import PAGES, write_tree

CHECKOUT = Path(__file__).resolve().parents[1]
PREFECT_YAML = CHECKOUT / "deployments" / "prefect.yaml"
API_KEY = "sk-test-" + uuid.uuid4().hex  # must never reach a log line
DEPLOYMENTS = ["nightly-ingest", "bulk-load", "backfill-model", "evaluate"]


# --- helpers over the server of tests/fix_prefect.py ------------------------------------------


def table_values(artifact: Any) -> dict[str, Any]:
    import json

    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {row["metric"]: row["value"] for row in rows}


def hash_parameters(source: Path) -> dict[str, Any]:
    return {"source": str(source), "provider": "hash", "model": "test", "dimensions": 64}


def storage_files(home: Path) -> list[Path]:
    storage = home / "storage"
    return [p for p in storage.rglob("*") if p.is_file()] if storage.exists() else []


# --- prefect.yaml, without a server -------------------------------------------------------


def test_prefect_yaml_describes_the_four_deployments() -> None:
    specs = {spec.name: spec for spec in read_deployment_specs(PREFECT_YAML)}

    assert list(specs) == DEPLOYMENTS
    (nightly,) = specs["nightly-ingest"].schedules
    assert (nightly.cron, nightly.timezone, nightly.active) == ("0 2 * * *", "UTC", True)
    assert all(not specs[name].schedules for name in DEPLOYMENTS[1:])
    assert all(specs[name].concurrency_limit == 1 for name in DEPLOYMENTS)
    (berlin,) = with_schedule(list(specs.values()), cron=None, timezone="Europe/Berlin")[0].schedules
    assert (berlin.cron, berlin.timezone) == ("0 2 * * *", "Europe/Berlin")


@pytest.mark.parametrize(
    ("name", "flow_name"),
    [
        ("nightly-ingest", "ingest"),
        ("bulk-load", "bulk-load"),
        ("backfill-model", "backfill"),
        ("evaluate", "evaluate"),
    ],
)
def test_each_entrypoint_is_the_expected_flow(name: str, flow_name: str) -> None:
    """Every parameter carries a description: the UI shows it under the field."""
    (spec,) = [spec for spec in read_deployment_specs(PREFECT_YAML) if spec.name == name]
    served = served_deployment(spec)
    module, function = spec.module_and_function
    form = getattr(importlib.import_module(module), function).parameters

    assert served.flow_name == flow_name
    assert served.concurrency_limit == 1
    assert [field for field, schema in form.properties.items() if not schema.get("description")] == []


def test_bulk_load_cannot_choose_its_index_strategy() -> None:
    from flows.ingest import bulk_load, ingest

    assert "index_strategy" in ingest.parameters.properties
    assert "index_strategy" not in bulk_load.parameters.properties


def test_run_settings_map_parameters_and_refuse_secrets_and_unknown_keys(tmp_path: Path) -> None:
    settings = run_settings(
        "environment",
        {"embed_concurrency": 2, "requests_per_minute": None},
        include=["docs/**/*.md"],
        provider="hash",
        model="m",
        dimensions=8,
        batch_size=16,
        chunker="environment",
        index_strategy="drop",
    )
    assert settings.include == ("docs/**/*.md",)
    assert settings.model_key == "hash:m:8"
    assert settings.embed_batch_inputs == 16 and settings.embed_concurrency == 2
    assert settings.index_strategy == "drop"
    assert settings.chunker == "headings"
    assert run_settings(None, None, chunker=None, provider="hash").chunker == "headings"

    for secret in ("openai_api_key", "database_url"):
        with pytest.raises(ParameterError, match=f"{secret} is set on the worker") as refused:
            checked_overrides({secret: API_KEY})
        assert API_KEY not in str(refused.value)
    with pytest.raises(ParameterError, match="'embed_batch' is not a setting"):
        checked_overrides({"embed_batch": 3})
    with pytest.raises(ParameterError, match="parameter 'source'"):
        existing_folder(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"openai_api_key": API_KEY},
        {"OPENAI_API_KEY": API_KEY},
        {"database_url": f"postgresql://u:{API_KEY}@h/db"},
        {"DATABASE_URL": f"postgresql://u:{API_KEY}@h/db"},
        {"openai_base_url": "http://127.0.0.1:9/v1"},
        {"embedding_model": {"openai_api_key": API_KEY}},
        {"embed_concurrency": {"nested": [API_KEY]}},
        {"embed_concurrency": 0},
        {"include": API_KEY},
    ],
)
def test_settings_overrides_refuse_secrets_unknown_keys_and_nested_values(overrides: dict[str, Any]) -> None:
    """The model is the parameter's type: what it refuses, the server refuses, and the error never
    shows the value."""
    with pytest.raises(pydantic.ValidationError) as refused:
        SettingsOverrides.model_validate(overrides)
    assert API_KEY not in str(refused.value)
    assert not is_valid({"settings_overrides": overrides}, flow_schema(ingest))


def test_settings_overrides_accept_null_as_missing_and_any_text() -> None:
    text = "ünïcødé 模型 " + "x" * 200
    overrides = SettingsOverrides.model_validate({"embedding_model": text, "requests_per_minute": None})
    assert checked_overrides(overrides) == {"embedding_model": text}
    assert checked_overrides(SettingsOverrides()) == checked_overrides(None) == {}
    assert is_valid({"source": "kb", "settings_overrides": None}, flow_schema(ingest))
    assert is_valid({"source": "kb", "settings_overrides": {}}, flow_schema(ingest))


def test_settings_overrides_are_settings_fields_with_the_same_constraints() -> None:
    """Every field a run may change is a Settings field, typed and bounded as Settings has it,
    and none of them is a secret or the API endpoint."""
    from config.settings import Settings

    assert not set(SettingsOverrides.model_fields) & WORKER_ONLY_SETTINGS
    assert SECRET_SETTINGS <= WORKER_ONLY_SETTINGS
    settings_schema = Settings.model_json_schema(by_alias=False)["properties"]
    overrides_schema = SettingsOverrides.model_json_schema()["properties"]
    for name, schema in overrides_schema.items():
        assert name in Settings.model_fields, name
        (typed,) = [branch for branch in schema["anyOf"] if branch != {"type": "null"}]
        expected = {k: v for k, v in settings_schema[name].items() if k not in ("title", "default")}
        if "anyOf" in expected:  # a Settings field that is optional itself
            (expected,) = [branch for branch in expected["anyOf"] if branch != {"type": "null"}]
        assert typed == expected, name


def test_every_choice_is_one_dropdown_with_its_default() -> None:
    """A choice is a single enum with a string default (the UI draws a select); null stays valid
    for callers that sent it before these choices had a default."""
    from flows.backfill import backfill
    from flows.evaluate import evaluate

    sync: dict[str, str | None] = {
        "profile": "environment",
        "chunker": "environment",
        "provider": "environment",
    }
    choices: dict[Any, dict[str, str | None]] = {
        ingest: {**sync, "index_strategy": "environment"},
        bulk_load: sync,
        backfill: {"profile": "environment", "precision": "auto", "provider": None},
        evaluate: {"profile": "environment"},
    }
    for flow_object, expected in choices.items():
        properties = flow_schema(flow_object)["properties"]
        for name, default in expected.items():
            schema = properties[name]
            assert schema.get("default") == default, (flow_object.name, name)
            enums = [branch for branch in schema.get("anyOf", [schema]) if "enum" in branch]
            assert len(enums) == 1 and (default is None or default in enums[0]["enum"]), (
                flow_object.name,
                name,
            )
    modes = flow_schema(evaluate)["properties"]["modes"]
    assert modes["default"] == ["vector", "lexical", "hybrid"]


def flow_schema(flow_object: Any) -> dict[str, Any]:
    return flow_object.parameters.model_dump_for_openapi()  # type: ignore[no-any-return]


def is_valid(parameters: dict[str, Any], schema: dict[str, Any]) -> bool:
    """The check the Prefect server makes before it creates a run (enforce_parameter_schema)."""
    from prefect.utilities.schema_tools.validation import validate

    return not validate(parameters, schema, ignore_required=True)


# --- stage retries, classified by SQLSTATE --------------------------------------------------


def raise_sqlstate(conn: Connection, sqlstate: str) -> None:
    """Make the server raise a real error with this SQLSTATE."""
    conn.execute(
        sql.SQL("DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = {}; END $$").format(
            sql.Literal(sqlstate)
        )
    )


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),
        ("40P01", True),
        ("08006", True),
        ("57P01", True),
        ("23505", False),
        ("57014", False),
        ("22P02", False),
    ],
)
def test_database_errors_are_classified_by_sqlstate(conn: Connection, sqlstate: str, transient: bool) -> None:
    with pytest.raises(psycopg.Error) as caught:
        raise_sqlstate(conn, sqlstate)
    assert caught.value.sqlstate == sqlstate
    assert is_transient(caught.value) is transient


def test_a_lost_connection_is_transient_and_other_errors_are_not(database_url: str) -> None:
    victim = connect(database_url)
    with connect(database_url) as killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError) as caught:
        victim.execute("SELECT 1")
    victim.close()
    assert is_transient(caught.value)
    assert not is_transient(ValueError("not a database error"))


@pytest.mark.prefect
def test_a_stage_retries_a_deadlock_but_not_a_unique_violation(
    prefect_server: PrefectServer, database_url: str
) -> None:
    from prefect import flow

    from tasks.stage import run_as_task, stage_task

    attempts: dict[str, int] = {"40P01": 0, "23505": 0}

    def fail_once(url: str, sqlstate: str) -> str:
        attempts[sqlstate] += 1
        if attempts[sqlstate] == 1 or sqlstate == "23505":
            with connect(url) as conn:
                raise_sqlstate(conn, sqlstate)
        return "done"

    stage = stage_task("fail-once", fail_once)

    @flow(persist_result=False)
    def retrying(sqlstate: str) -> str:
        return run_as_task(stage, database_url, sqlstate)

    with api(prefect_server):
        assert retrying("40P01") == "done"
        with pytest.raises(psycopg.errors.UniqueViolation):
            retrying("23505")
    assert attempts == {"40P01": 2, "23505": 1}


# --- embedding calls under Prefect global concurrency and rate limits ----------------------


class InFlightEmbedder(HashEmbedder):
    """Counts the requests in flight at once; each one yields to the loop while it runs."""

    max_concurrency = 4

    def __init__(self) -> None:
        super().__init__("test", 8)
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.in_flight += 1
        self.requests += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # the request's latency, so batches overlap without a limit
            return await super().embed(texts)
        finally:
            self.in_flight -= 1


def embed_eight_batches(
    *, concurrency_limit: str | None = None, rate_limit: str | None = None
) -> InFlightEmbedder:
    embedder = InFlightEmbedder()
    items = [EmbedItem(bytes([i]), f"text {i}", 2) for i in range(8)]
    policy = EmbedPolicy(
        batch_inputs=1,
        batch_tokens=1000,
        concurrency=4,
        max_attempts=1,
        max_backoff=0.1,
        concurrency_limit=concurrency_limit,
        rate_limit=rate_limit,
    )
    stored: list[Vectors] = []
    asyncio.run(embed_items(embedder, items, policy, lambda hashes, vectors: stored.append(vectors)))
    assert sum(len(v) for v in stored) == 8 and np.isfinite(np.concatenate(stored)).all()
    return embedder


@pytest.mark.prefect
def test_embedding_requests_hold_the_named_global_concurrency_limit(prefect_server: PrefectServer) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"embed-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=1)
    call(prefect_server, lambda c: c.create_global_concurrency_limit(create))
    with api(prefect_server):
        unlimited = embed_eight_batches()
        limited = embed_eight_batches(concurrency_limit=name)

    assert unlimited.most_in_flight > 1
    assert limited.most_in_flight == 1 and limited.requests == 8


@pytest.mark.prefect
def test_embedding_requests_take_a_slot_of_the_named_rate_limit(prefect_server: PrefectServer) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"embed-rate-{uuid.uuid4().hex[:8]}"
    create = GlobalConcurrencyLimitCreate(name=name, limit=100, slot_decay_per_second=0.001)
    call(prefect_server, lambda c: c.create_global_concurrency_limit(create))
    with api(prefect_server):
        embed_eight_batches(rate_limit=name)
        with pytest.raises(Exception, match="must be created before acquiring slots"):
            embed_eight_batches(rate_limit=f"{name}-missing")

    limit = call(prefect_server, lambda c: c.read_global_concurrency_limit_by_name(name))
    assert limit.active_slots == 8


# --- the deployments end to end -----------------------------------------------------------


@pytest.mark.prefect
def test_deploy_all_creates_the_deployments_with_schedule_limits_and_a_typed_form(
    deployed: PrefectServer,
) -> None:
    nightly = deployment(deployed, "ingest/nightly-ingest")
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.parameters == {"source": "samples/knowledge"}
    assert nightly.work_pool_name == "ragingest"
    names = ["ingest/nightly-ingest", "bulk-load/bulk-load", "backfill/backfill-model", "evaluate/evaluate"]
    for name in names:
        found = deployment(deployed, name)
        assert found.global_concurrency_limit.limit == 1, name
        assert found.enforce_parameter_schema, name

    form = deployment(deployed, "bulk-load/bulk-load").parameter_openapi_schema
    assert form["required"] == ["source"]
    assert "index_strategy" not in form["properties"]
    dimensions = form["properties"]["dimensions"]
    assert dimensions["description"].startswith("Vector dimensions")
    bounds = [{k: option.get(k) for k in ("type", "minimum", "maximum")} for option in dimensions["anyOf"]]
    assert {"type": "integer", "minimum": 1, "maximum": 16000} in bounds


@pytest.mark.prefect
@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"source": "kb", "dimensions": 0}, "'dimensions'"),
        ({"source": "kb", "chunker": "words"}, "'chunker'"),
        ({"source": "kb", "batch_size": "many"}, "'batch_size'"),
        ({"dimensions": 64}, "'source'"),
    ],
)
def test_an_invalid_parameter_is_refused_before_a_run_exists(
    deployed: PrefectServer, parameters: dict[str, Any], named: str
) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    target = deployment(deployed, "bulk-load/bulk-load")
    only_bulk = DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
    before = call(deployed, lambda c: c.count_flow_runs(deployment_filter=only_bulk))

    with pytest.raises(httpx.HTTPStatusError) as refused:
        start_run(deployed, "bulk-load/bulk-load", parameters)

    assert refused.value.response.status_code == 409
    assert named in refused.value.response.text and "Validation failed" in refused.value.response.text
    assert call(deployed, lambda c: c.count_flow_runs(deployment_filter=only_bulk)) == before


DB_PASSWORD = "pw-" + uuid.uuid4().hex
SECRET_URL = f"postgresql://ragingest:{DB_PASSWORD}@127.0.0.1:5432/knowledge"
REQUIRED: dict[str, dict[str, Any]] = {
    "ingest/nightly-ingest": {},
    "bulk-load/bulk-load": {"source": "kb"},
    "backfill/backfill-model": {"provider": "hash", "model": "m", "dimensions": 8},
    "evaluate/evaluate": {"cases": "cases.jsonl"},
}
SECRET_PARAMETERS: list[dict[str, Any]] = [
    {"settings_overrides": {"openai_api_key": API_KEY}},
    {"settings_overrides": {"OPENAI_API_KEY": API_KEY}},
    {"settings_overrides": {"database_url": SECRET_URL}},
    {"settings_overrides": {"embed_concurrency": 2, "database_url": SECRET_URL}},
    {"settings_overrides": {"embedding_model": {"openai_api_key": API_KEY}}},
    {"settings_overrides": {"openai_base_url": f"http://{DB_PASSWORD}.invalid/v1"}},
]


def runs_of(server: PrefectServer, name: str) -> int:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    target = deployment(server, name)
    only = DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
    runs = call(server, lambda c: c.read_flow_runs(deployment_filter=only))
    return sum(1 for run in runs if not run.auto_scheduled)  # the nightly schedule adds its own


@pytest.mark.prefect
@pytest.mark.parametrize("name", list(REQUIRED))
def test_a_secret_given_as_a_parameter_is_refused_and_stored_nowhere(
    deployed: PrefectServer, name: str
) -> None:
    before = runs_of(deployed, name)
    for secret in SECRET_PARAMETERS:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            start_run(deployed, name, {**REQUIRED[name], **secret})
        assert refused.value.response.status_code == 409, refused.value.response.text
        assert "for field 'settings_overrides" in refused.value.response.text
    text_field = {"backfill/backfill-model": "model", "evaluate/evaluate": "cases"}.get(name, "source_name")
    pasted: list[dict[str, Any]] = [{text_field: f"kb {API_KEY}"}, {text_field: SECRET_URL}]
    if name == "evaluate/evaluate":
        pasted.append({"search_options": {"api_key": API_KEY}})
    for secret in pasted:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            start_run(deployed, name, {**REQUIRED[name], **secret})
        assert refused.value.response.status_code == 409, refused.value.response.text

    assert runs_of(deployed, name) == before
    stored = everything_stored(deployed)
    assert API_KEY not in stored and DB_PASSWORD not in stored


@pytest.mark.prefect
@pytest.mark.parametrize("name", list(REQUIRED))
def test_choices_sent_as_null_or_by_name_still_create_a_run(deployed: PrefectServer, name: str) -> None:
    """Callers written before the choices had defaults sent null; both spellings are accepted."""
    from prefect.client.schemas.objects import StateType

    choices = {
        "ingest/nightly-ingest": ["profile", "chunker", "provider", "index_strategy"],
        "bulk-load/bulk-load": ["profile", "chunker", "provider"],
        "backfill/backfill-model": ["profile", "precision"],
        "evaluate/evaluate": ["profile", "modes", "settings_overrides"],
    }[name]
    defaults = deployment(deployed, name).parameter_openapi_schema["properties"]
    for value in (None, "default"):
        parameters = {
            **REQUIRED[name],
            **{field: None if value is None else defaults[field]["default"] for field in choices},
        }
        flow_run_id = start_run(deployed, name, parameters)
        run = call(deployed, lambda client: client.read_flow_run(flow_run_id))  # noqa: B023
        assert {key: run.parameters[key] for key in parameters} == parameters
        # Cancel it at once, so no worker of a later test picks it up.
        from prefect.states import Cancelled

        call(deployed, lambda client: client.set_flow_run_state(flow_run_id, Cancelled(), force=True))  # noqa: B023
        run = call(deployed, lambda client: client.read_flow_run(flow_run_id))  # noqa: B023
        assert run.state.type == StateType.CANCELLED


@pytest.mark.prefect
def test_bulk_load_run_by_a_worker_loads_rows_publishes_the_summary_and_persists_nothing(
    deployed: PrefectServer, database_url: str, conn: Connection, tmp_path: Path
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    flow_run_id = start_run(deployed, "bulk-load/bulk-load", hash_parameters(kb))
    log = tmp_path / "worker.log"
    env = deployed.env(DATABASE_URL=database_url, OPENAI_API_KEY=API_KEY)
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "ragingest", "--run-once"]
    with background(command, env, log) as worker:
        try:
            worker.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {RUN_SECONDS:.0f} s:\n{tail(log)}")

    run = call(deployed, lambda client: client.read_flow_run(flow_run_id))
    assert run.state.is_completed(), f"{run.state}\n{tail(log)}"

    documents = conn.execute("SELECT count(*) FROM documents").fetchone()
    chunks = conn.execute("SELECT count(*), count(emb_test_64) FROM chunks").fetchone()
    assert documents == (4,)
    assert chunks is not None and chunks[0] > 0 and chunks[1] == chunks[0]

    artifacts = run_artifacts(deployed, flow_run_id)
    assert {"ingest-summary", "ingest-failures", "ingest-progress"} <= set(artifacts)
    summary = table_values(artifacts["ingest-summary"])
    assert summary["documents.new"] == 4 and summary["documents.excluded"] == 1
    assert summary["chunks.written"] == summary["chunks.total"] == chunks[0]
    assert summary["index.strategy"] == "drop"

    messages = run_logs(deployed, flow_run_id)
    assert any("Finished in state Completed" in message for message in messages)
    assert not [m for m in messages if API_KEY in m]
    assert API_KEY not in log.read_text(errors="replace")
    assert storage_files(deployed.client_home) == []


@pytest.mark.prefect
def test_a_malformed_database_url_fails_the_run_with_its_password_masked(
    deployed: PrefectServer, tmp_path: Path
) -> None:
    """The worker's DATABASE_URL is a SQLAlchemy URL: the run fails, and neither its state
    message nor any log line the server keeps shows the password."""
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    flow_run_id = start_run(deployed, "bulk-load/bulk-load", hash_parameters(kb))
    log = tmp_path / "worker.log"
    env = deployed.env(DATABASE_URL=f"postgresql+psycopg://ragingest:{DB_PASSWORD}@127.0.0.1:5432/kb")
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "ragingest", "--run-once"]
    with background(command, env, log) as worker:
        try:
            worker.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {RUN_SECONDS:.0f} s:\n{tail(log)}")

    run = call(deployed, lambda client: client.read_flow_run(flow_run_id))
    assert run.state.is_failed(), f"{run.state}\n{tail(log)}"
    assert "postgresql+psycopg://ragingest:***@" in run.state.message
    assert any("SQLAlchemy URL" in message for message in run_logs(deployed, flow_run_id))
    assert DB_PASSWORD not in everything_stored(deployed)
    assert DB_PASSWORD not in log.read_text(errors="replace")


@pytest.mark.prefect
def test_ragingest_serve_runs_a_bulk_load_triggered_through_the_api(
    deployed: PrefectServer, database_url: str, conn: Connection, tmp_path: Path
) -> None:
    kb = write_tree(tmp_path / "kb", dict(PAGES))
    log = tmp_path / "serve.log"
    env = deployed.env(DATABASE_URL=database_url, PREFECT_RUNNER_POLL_FREQUENCY="1")
    stored_before = set(storage_files(deployed.client_home))  # failed runs of other tests keep their error
    with background([str(BIN / "ragingest"), "serve", "--only", "bulk-load"], env, log) as serve:
        flow_run_id = start_run(deployed, "bulk-load/bulk-load", hash_parameters(kb))
        run = wait_for_final_state(deployed, flow_run_id, serve, log)

    assert run.state.is_completed(), f"{run.state}\n{tail(log)}"
    assert conn.execute("SELECT count(*) FROM documents").fetchone() == (4,)
    assert "ingest-summary" in run_artifacts(deployed, flow_run_id)
    assert set(storage_files(deployed.client_home)) - stored_before == set()  # no result persisted
