"""Hostile parameters: slugs, column names, globs, namespaces and model names carrying SQL or
path-traversal payloads are refused or stored as inert data; no SQL is built by string formatting."""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from psycopg import sql

from flows.backfill import run_backfill
from flows.ingest import run_ingest
from tasks.db import Connection
from tasks.discover import GlobError, compile_globs, validate_glob, walk_source
from tasks.records import FoundFile
from tasks.registry import (
    EmbeddingModel,
    InvalidIdentifier,
    create_hnsw_index,
    drop_hnsw_index,
    get_model,
    register_model,
    validate_slug,
)
from tests.conftest import make_settings
from tests.reliability.harness import REPO, error_line, run_cli, table_snapshot, worker_env
from tests.reliability.report import SEED, CaseFigures

SCENARIO = "Hostile parameters"
SOURCE = "kb"

SQL_PAYLOADS = [
    "x; DROP TABLE chunks",
    "x'; DROP TABLE chunks; --",
    'x"; DROP TABLE chunks; --',
    "Robert'); DROP TABLE documents;--",
    "x) WITH (m = 2); DROP TABLE chunks; --",
    'emb_x" --',
    "x\x00y",
    "x/**/OR/**/1=1",
    "$$; DROP TABLE chunks; $$",
]
PATH_PAYLOADS = ["../etc", "../../etc/passwd", "/etc/passwd", "..\\..\\windows", "a/../../b", "~root/.ssh"]
SLUG_PAYLOADS = [*SQL_PAYLOADS, *PATH_PAYLOADS, "", "A", "1abc", "a" * 45, "ÿ", "a-b", "a b"]
GLOB_PAYLOADS = [
    "../*.md",
    "../../etc/**",
    "/etc/passwd",
    "**/../*.md",
    "a/../../b.md",
    "docs/..",
    "x\x00.md",
    "..\\secret.md",
    "",
    ".",
    "./",
    "//",
]


def core_tables(conn: Connection) -> set[str]:
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        " AND tablename IN ('chunks', 'documents', 'embedding_models', 'embedding_cache', 'ingest_runs')"
    )
    return {row[0] for row in rows}


ALL_TABLES = {"chunks", "documents", "embedding_models", "embedding_cache", "ingest_runs"}


@pytest.fixture
def loaded(database_url: str, tmp_path: Path) -> Iterator[Any]:
    root = tmp_path / "kb"
    root.mkdir()
    (root / "page.md").write_text("# Page\n\nSome text.\n\n## More\n\nMore text.\n")
    settings = make_settings(database_url)
    run_ingest(settings, root, source_name=SOURCE)
    yield settings


def test_hostile_model_slugs_are_refused_everywhere(
    loaded: Any, conn: Connection, figures: CaseFigures
) -> None:
    for payload in SLUG_PAYLOADS:
        figures.bad_inputs += 1
        with pytest.raises(InvalidIdentifier):
            validate_slug(payload)
        with pytest.raises(InvalidIdentifier):
            get_model(conn, payload)
        with pytest.raises(InvalidIdentifier), conn.transaction():
            register_model(
                conn, provider="hash", model=f"m{len(payload)}", dimensions=8, status="ready", slug=payload
            )
        if "\x00" not in payload:  # the database refuses what the code lets through, too
            with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
                conn.execute(
                    "INSERT INTO embedding_models"
                    " (slug, provider, model, dimensions, column_name, precision, status)"
                    " VALUES (%s, 'hash', 'x', 8, 'emb_' || %s, 'vector', 'ready')",
                    (payload, payload),
                )
    assert core_tables(conn) == ALL_TABLES
    assert [row[0] for row in conn.execute("SELECT slug FROM embedding_models")] == ["test_64"]


def test_hostile_column_names_and_index_names_are_quoted_never_executed(
    loaded: Any, conn: Connection, figures: CaseFigures
) -> None:
    conn.execute("CREATE TABLE canary (x int)")
    for payload in SQL_PAYLOADS:
        if "\x00" in payload:
            continue
        figures.bad_inputs += 1
        model = EmbeddingModel(
            slug="x",
            provider="hash",
            model="x",
            dimensions=64,
            column_name=f"emb_{payload}",
            precision="vector",
            hnsw_m=16,
            hnsw_ef_construction=64,
            status="ready",
        )
        with pytest.raises(psycopg.errors.UndefinedColumn):
            create_hnsw_index(conn, model)
        drop_hnsw_index(conn, model)  # IF EXISTS on a quoted name that does not exist: nothing happens
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute(
                "INSERT INTO embedding_models"
                " (slug, provider, model, dimensions, column_name, precision, status)"
                " VALUES ('x', 'hash', 'x', 8, %s, 'vector', 'ready')",
                (f"emb_{payload}",),
            )
    assert core_tables(conn) == ALL_TABLES
    assert conn.execute("SELECT to_regclass('canary') IS NOT NULL").fetchone() == (True,)


def test_a_hostile_precision_never_runs_as_sql(loaded: Any, conn: Connection, figures: CaseFigures) -> None:
    conn.execute("CREATE TABLE canary (x int)")
    figures.bad_inputs += 1
    model = EmbeddingModel(
        slug="test_64",
        provider="hash",
        model="test",
        dimensions=64,
        column_name="emb_test_64",
        precision="vector_cosine_ops); DROP TABLE canary; --",
        hnsw_m=16,
        hnsw_ef_construction=64,
        status="ready",
    )
    drop_hnsw_index(conn, model)
    with contextlib.suppress(Exception):  # any refusal is fine; running the payload is not
        create_hnsw_index(conn, model)
    assert conn.execute("SELECT to_regclass('canary') IS NOT NULL").fetchone() == (True,)


def test_hostile_model_names_are_stored_as_inert_data(
    loaded: Any, conn: Connection, figures: CaseFigures
) -> None:
    names = ["x'; DROP TABLE chunks; --", "../../etc/passwd"]
    for dimensions, name in enumerate(names, start=16):
        figures.bad_inputs += 1
        figures.runs += 1
        summary = run_backfill(loaded, provider="hash", model=name, dimensions=dimensions)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", summary["model"]["slug"])
        assert summary["rows"]["remaining"] == 0 and summary["index"]["valid"]
    stored = {row[0] for row in conn.execute("SELECT model FROM embedding_models")}
    assert stored == {"test", *names}
    assert core_tables(conn) == ALL_TABLES


def test_hostile_globs_are_refused_before_anything_is_read_or_written(
    database_url: str, loaded: Any, conn: Connection, tmp_path: Path, figures: CaseFigures
) -> None:
    root = tmp_path / "kb"
    before = table_snapshot(conn)
    for pattern in GLOB_PAYLOADS:
        figures.bad_inputs += 1
        with pytest.raises(GlobError):
            validate_glob(pattern)
        with pytest.raises(GlobError):
            walk_source(root, include=[pattern])
        with pytest.raises(GlobError):
            walk_source(root, exclude=[pattern])
        with pytest.raises(GlobError):
            run_ingest(make_settings(database_url, include=(pattern,)), root, source_name=SOURCE)
    assert table_snapshot(conn) == before

    env = worker_env(
        database_url,
        f"reliability-glob-{tmp_path.name}",
        EMBEDDING_PROVIDER="hash",
        EMBEDDING_MODEL="test",
        EMBEDDING_DIMENSIONS="64",
        RAGINGEST_INCLUDE="docs/*.md,../*.md",
    )
    figures.runs += 1
    code, output = run_cli(
        ["ingest", str(root), "--source-name", SOURCE, "--no-prefect"], env, tmp_path / "glob.log"
    )
    assert code == 1
    message = error_line(output)
    figures.messages.append(message)
    assert "glob pattern '../*.md' refused: a '..' segment would leave the source root" in message
    assert table_snapshot(conn) == before


@pytest.fixture(scope="module")
def fenced_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source with a sibling folder outside it that no pattern may reach."""
    base = tmp_path_factory.mktemp("fence")
    for relative in ("kb/a.md", "kb/docs/b.md", "kb/.hidden/c.md", "outside/secret.md"):
        (base / relative).parent.mkdir(parents=True, exist_ok=True)
        (base / relative).write_text("# Page\n")
    return base / "kb"


@seed(SEED)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pattern=st.text(alphabet=st.sampled_from("ab*?[]!^-/.\\{}()|+$~\x00 "), max_size=14))
def test_generated_globs_are_refused_or_stay_inside_the_source(
    pattern: str, fenced_tree: Path, figures: CaseFigures
) -> None:
    figures.bad_inputs += 1
    try:
        compile_globs([pattern])
        found = list(walk_source(fenced_tree, include=[pattern]))
    except GlobError:
        return
    for item in found:
        assert not item.path.startswith(("/", "../")) and "/../" not in item.path
        if isinstance(item, FoundFile):
            assert Path(item.abs_path).resolve().is_relative_to(fenced_tree.resolve())


def test_hostile_namespaces_and_source_names_are_stored_as_inert_data(
    database_url: str, conn: Connection, tmp_path: Path, figures: CaseFigures
) -> None:
    from tasks.search import SearchFilters, filter_clause

    root = tmp_path / "kb"
    root.mkdir()
    namespaces = [payload for payload in [*SQL_PAYLOADS, *PATH_PAYLOADS] if "\x00" not in payload]
    for number, namespace in enumerate(namespaces):
        quoted = namespace.replace("\\", "\\\\").replace('"', '\\"')
        (root / f"page{number}.md").write_text(
            f'---\nrag_namespace: "{quoted}"\n---\n# Page {number}\n\nText {number}.\n'
        )
    source = "kb'); DROP TABLE documents; --/../../etc"
    figures.bad_inputs += len(namespaces) + 1
    figures.runs += 1
    run_ingest(make_settings(database_url), root, source_name=source)

    stored = dict(
        conn.execute("SELECT path, namespace FROM documents WHERE source = %s", (source,)).fetchall()
    )
    assert stored == {f"page{number}.md": namespace for number, namespace in enumerate(namespaces)}
    assert core_tables(conn) == ALL_TABLES
    for number, namespace in enumerate(namespaces):
        where, params = filter_clause(SearchFilters(namespace=namespace))
        rows = conn.execute(
            sql.SQL("SELECT d.path FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {}").format(
                where
            ),
            params,
        ).fetchall()
        assert rows == [(f"page{number}.md",)]


# --- no SQL built by string formatting -----------------------------------------------------

PRODUCT_FOLDERS = ("tasks", "flows", "config")
SQL_TEXT = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|COPY|VACUUM|TRUNCATE|GRANT|SET)\b[\s\S]*"
    r"\b(FROM|INTO|TABLE|INDEX|SET|WHERE|VALUES|ON|LOCAL)\b"
)


def product_modules() -> Iterator[tuple[str, ast.Module]]:
    for folder in PRODUCT_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield str(path.relative_to(REPO)), ast.parse(path.read_text(encoding="utf-8"))


def literal_text(node: ast.AST) -> str:
    """The constant text parts of a formatting expression."""
    return " ".join(
        part.value
        for part in ast.walk(node)
        if isinstance(part, ast.Constant) and isinstance(part.value, str)
    )


def formatted_strings(tree: ast.Module) -> Iterator[ast.expr]:
    """f-strings with fields, `"...".format(...)` and `"..." % ...`."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr):
            continue
        if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
            yield node
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant)
            and isinstance(node.func.value.value, str)
        ):
            yield node
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
        ):
            yield node


def test_no_sql_statement_is_built_by_string_formatting(figures: CaseFigures) -> None:
    offenders = [
        f"{name}:{node.lineno}: {ast.unparse(node)[:100]}"
        for name, tree in product_modules()
        for node in formatted_strings(tree)
        if SQL_TEXT.search(literal_text(node))
    ]
    figures.notes.append(f"{sum(1 for _ in product_modules())} product modules scanned")
    assert offenders == []


def _module_string_constants(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def _is_constant_text(node: ast.AST, constants: set[str]) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    if isinstance(node, ast.Name):
        return node.id in constants
    if isinstance(node, ast.IfExp):
        return _is_constant_text(node.body, constants) and _is_constant_text(node.orelse, constants)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_constant_text(node.left, constants) and _is_constant_text(node.right, constants)
    return False


CATALOG_TEXT = "catalog_sql"
"""tasks/schema.py's one function that passes catalog-printed DDL (from our own migrations) on."""


def _outside_catalog_sql(tree: ast.Module) -> Iterator[ast.AST]:
    inside = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef) and function.name == CATALOG_TEXT
        for node in ast.walk(function)
    }
    return (node for node in ast.walk(tree) if id(node) not in inside)


def test_only_constant_text_reaches_psycopg_sql_SQL(figures: CaseFigures) -> None:
    offenders = []
    for name, tree in product_modules():
        constants = _module_string_constants(tree)
        for node in _outside_catalog_sql(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            is_sql_call = node.func.attr == "SQL" and ast.unparse(node.func.value) in ("sql", "psycopg.sql")
            if is_sql_call and node.args and not _is_constant_text(node.args[0], constants):
                offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)[:90]}")
    assert offenders == [], offenders


# --- flow parameters: what the Prefect server refuses before a run exists -------------------

KEY = "sk-proj-" + "Q7x" * 12
REFUSED_PARAMETERS: list[tuple[str, dict[str, Any]]] = [
    ("a key in source_name", {"source_name": f"kb {KEY}"}),
    ("a URL with a password in source_name", {"source_name": "postgresql://kb:hunter2@db/kb"}),
    ("a connection string's password in model", {"model": "host=db password=hunter2"}),
    ("a key in a glob", {"include": [f"{KEY}/*.md"]}),
    ("a NUL in source_name", {"source_name": "kb\x00x"}),
    ("a newline in source", {"source": "kb\n--full-refresh"}),
    ("a huge source", {"source": "k" * 5000}),
    ("a huge source_name", {"source_name": "n" * 1025}),
    ("a thousand and one globs", {"include": ["*.md"] * 1001}),
    ("an empty glob list", {"include": []}),
    ("a secret setting", {"settings_overrides": {"openai_api_key": KEY}}),
    ("the database URL", {"settings_overrides": {"database_url": "postgresql://kb:hunter2@db/kb"}}),
    ("the API endpoint", {"settings_overrides": {"openai_base_url": "http://127.0.0.1:9/v1"}}),
    ("an unknown setting", {"settings_overrides": {"embed_batch": 3}}),
    ("a nested dict for a number", {"settings_overrides": {"embed_concurrency": {"value": 2}}}),
    ("a nested dict for a name", {"settings_overrides": {"embedding_model": {"name": KEY}}}),
    ("a list of overrides", {"settings_overrides": [{"embed_concurrency": 2}]}),
    ("an unknown choice", {"chunker": "sentences"}),
    ("a choice in another case", {"profile": "PROD"}),
    ("a float for an int", {"dimensions": 64.5}),
    ("a huge int", {"dimensions": 10**30}),
]
ACCEPTED_PARAMETERS: list[tuple[str, dict[str, Any]]] = [
    ("unicode names", {"source_name": "知识库 ünïcødé ✓", "model": "модель-1"}),
    ("null choices", {"profile": None, "chunker": None, "provider": None, "index_strategy": None}),
    ("named choices", {"profile": "environment", "chunker": "tokens", "index_strategy": "drop"}),
    ("null overrides", {"settings_overrides": None}),
    ("empty overrides", {"settings_overrides": {}}),
    ("null inside overrides", {"settings_overrides": {"embed_concurrency": None, "hnsw_m": 24}}),
    ("a long but legal source", {"source": "k" * 4096}),
]


def ingest_schema() -> dict[str, Any]:
    from flows.ingest import ingest

    return ingest.parameters.model_dump_for_openapi()


@pytest.mark.parametrize(("case", "parameters"), REFUSED_PARAMETERS, ids=[c for c, _ in REFUSED_PARAMETERS])
def test_hostile_flow_parameters_are_refused_by_the_schema_and_by_the_flow(
    case: str, parameters: dict[str, Any], figures: CaseFigures
) -> None:
    """The server's check (Prefect's own validator over the deployment's schema) and the flow's
    own validation on the worker refuse the same values."""
    from prefect.utilities.schema_tools.validation import validate

    from flows.ingest import ingest

    figures.bad_inputs += 1
    full = {"source": "kb", **parameters}
    assert validate(full, ingest_schema()), case
    with pytest.raises(Exception, match="invalid parameters|validation"):
        ingest.validate_parameters(full)


@pytest.mark.parametrize(("case", "parameters"), ACCEPTED_PARAMETERS, ids=[c for c, _ in ACCEPTED_PARAMETERS])
def test_odd_but_legal_flow_parameters_are_accepted_and_mean_what_they_say(
    case: str, parameters: dict[str, Any], figures: CaseFigures
) -> None:
    from prefect.utilities.schema_tools.validation import validate

    from flows.ingest import ingest
    from flows.params import run_settings

    figures.bad_inputs += 1
    full = {"source": "kb", **parameters}
    assert validate(full, ingest_schema()) == [], case
    checked = ingest.validate_parameters(full)
    for name, value in parameters.items():
        if name != "settings_overrides":
            assert checked[name] == value, name
    choices = {k: checked[k] for k in ("chunker", "provider", "index_strategy", "include", "model")}
    settings = run_settings(checked["profile"], checked["settings_overrides"], **choices)
    assert settings.chunker == (parameters.get("chunker") or "headings").replace("environment", "headings")
    if (parameters.get("settings_overrides") or {}).get("hnsw_m"):
        assert settings.hnsw_m == 24 and settings.embed_concurrency == 4
