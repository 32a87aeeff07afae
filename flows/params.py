"""Typed flow parameters: the Prefect UI draws them as a form, and the server validates them.

The constraints live in these types, so the parameter schema of a deployment
carries them and the server refuses a run with an invalid value before the run
exists, naming the field. That matters most for secrets: Prefect stores a run's
parameters in plain text before the flow body runs, so a secret has to be
refused by the schema itself. `SettingsOverrides` therefore lists the settings a
run may change, by name, and forbids every other key; the database URL, the API
key and the API endpoint come from the worker's environment only.

A choice is a dropdown with an explicit default. `environment` (and, for calls
made before these choices existed, None) keeps the worker's setting: its
profile, then its environment (EMBEDDING_PROVIDER, RAGINGEST_CHUNKER, ...), then
the default. The descriptions live in each flow's docstring (`Args:`), which is
where Prefect reads them from.

A new parameter is a type here plus, when it maps onto a setting, one line in
SETTING_FOR_PARAMETER.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from config.settings import ChunkerName, IndexStrategy, ProviderName, Settings, load_settings

ENVIRONMENT: Final = "environment"
"""The choice that keeps the worker's setting."""
FromEnvironment = Literal["environment"]

SECRET_SHAPE = r"sk-[A-Za-z0-9_-]{20,}|://[^/\s:@]*:[^/\s@]+@|password\s*="
"""An API key, a URL with a password, or a connection string's password=: refused in any text
parameter, so a secret pasted into the wrong field is not stored either."""


def _refuse_secret_shape(value: str) -> str:
    if re.search(SECRET_SHAPE, value):
        raise ValueError(
            "this looks like a secret (an API key, or a URL or connection string with a password); "
            "secrets belong in the environment of the worker"
        )
    return value


# Text of a parameter: no NUL or other control character (Postgres text refuses NUL), and
# nothing shaped like a secret (`not` for the server and the form, the validator for direct calls).
_Text = Annotated[
    str,
    Field(min_length=1, pattern=r"^[^\x00-\x1f\x7f]*$", json_schema_extra={"not": {"pattern": SECRET_SHAPE}}),
    AfterValidator(_refuse_secret_shape),
]

SourcePath = Annotated[_Text, Field(max_length=4096)]
SourceName = Annotated[_Text, Field(max_length=1024)] | None
Profile = Literal[FromEnvironment, Literal["dev", "prod"]] | None
Glob = Annotated[_Text, Field(max_length=1024)]
Globs = Annotated[list[Glob], Field(min_length=1, max_length=1000)] | None
Chunker = Literal[FromEnvironment, ChunkerName] | None
Provider = Literal[FromEnvironment, ProviderName] | None
ModelNameText = Annotated[_Text, Field(max_length=256)]
ModelName = ModelNameText | None
Dimensions = Annotated[int, Field(ge=1, le=16000)] | None
BatchSize = Annotated[int, Field(ge=1, le=2048)] | None
IndexStrategyChoice = Literal[FromEnvironment, IndexStrategy] | None
PrecisionChoice = Literal["auto", "vector", "halfvec"] | None
"""auto (or None): halfvec above 2,000 dimensions, else vector."""
FilePath = Annotated[_Text, Field(max_length=4096)]
SearchModes = tuple[Literal["vector", "lexical", "hybrid"], ...] | None
"""Empty or None: every mode."""
ModelSlugs = list[Annotated[_Text, Field(max_length=256)] | None] | None
MetricName = Literal["pass@1", "pass@3", "pass@k", "recall@k", "mrr", "ndcg@10"]
Thresholds = dict[MetricName, float] | None
ResultsRead = Annotated[int, Field(ge=1, le=1000)]
Tolerance = Annotated[float, Field(ge=0)]

# Flow parameter -> the Settings field it overrides.
SETTING_FOR_PARAMETER: dict[str, str] = {
    "include": "include",
    "exclude": "exclude",
    "chunker": "chunker",
    "provider": "embedding_provider",
    "model": "embedding_model",
    "dimensions": "embedding_dimensions",
    "batch_size": "embed_batch_inputs",
    "index_strategy": "index_strategy",
    "workers": "workers",
    "cluster": "dask_address",
}

# Settings no parameter may carry. Prefect stores parameters in plain text and shows them in
# the UI, so secrets come from the worker's environment only; the endpoint too, since a run
# that could point it elsewhere would send the worker's API key there.
WORKER_ONLY_SETTINGS = frozenset({"database_url", "openai_api_key", "openai_base_url"})
SECRET_SETTINGS = frozenset({"database_url", "openai_api_key"})


def _setting(name: str) -> Any:
    """The constraints and description of Settings.<name>, on an optional field that defaults to None."""
    source: FieldInfo = Settings.model_fields[name]
    field = cast(FieldInfo, Field(default=None, description=_SETTING_DOCS.get(name)))
    field.metadata = list(source.metadata)
    return field


def _attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a class body (Settings documents its fields that way)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, following in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


_SETTING_DOCS = _attribute_docs(Settings)


class SettingsOverrides(BaseModel):
    """Advanced: other settings of this run, by field name. Empty or null: the worker's setting.

    Any other key is refused by the server before the run exists, secrets included.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    home: Path | None = _setting("home")
    embedding_provider: ProviderName | None = _setting("embedding_provider")
    embedding_model: str | None = _setting("embedding_model")
    embedding_dimensions: int | None = _setting("embedding_dimensions")
    embed_concurrency: int | None = _setting("embed_concurrency")
    embed_batch_inputs: int | None = _setting("embed_batch_inputs")
    embed_batch_tokens: int | None = _setting("embed_batch_tokens")
    embed_timeout_seconds: float | None = _setting("embed_timeout_seconds")
    embed_max_attempts: int | None = _setting("embed_max_attempts")
    embed_max_backoff_seconds: float | None = _setting("embed_max_backoff_seconds")
    requests_per_minute: int | None = _setting("requests_per_minute")
    tokens_per_minute: int | None = _setting("tokens_per_minute")
    embed_concurrency_limit: str | None = _setting("embed_concurrency_limit")
    embed_rate_limit: str | None = _setting("embed_rate_limit")
    cost_per_million_tokens: float | None = _setting("cost_per_million_tokens")
    include: tuple[str, ...] | None = _setting("include")
    exclude: tuple[str, ...] | None = _setting("exclude")
    max_file_bytes: int | None = _setting("max_file_bytes")
    chunker: ChunkerName | None = _setting("chunker")
    chunk_max_tokens: int | None = _setting("chunk_max_tokens")
    token_window: int | None = _setting("token_window")
    token_overlap: int | None = _setting("token_overlap")
    stream_batch_chunks: int | None = _setting("stream_batch_chunks")
    index_strategy: IndexStrategy | None = _setting("index_strategy")
    auto_drop_fraction: float | None = _setting("auto_drop_fraction")
    auto_drop_min_rows: int | None = _setting("auto_drop_min_rows")
    hnsw_m: int | None = _setting("hnsw_m")
    hnsw_ef_construction: int | None = _setting("hnsw_ef_construction")
    maintenance_work_mem: str | None = _setting("maintenance_work_mem")
    max_parallel_maintenance_workers: int | None = _setting("max_parallel_maintenance_workers")
    lock_timeout_seconds: float | None = _setting("lock_timeout_seconds")
    search_min_score: float | None = _setting("search_min_score")
    search_ef_search: int | None = _setting("search_ef_search")
    search_rrf_k: int | None = _setting("search_rrf_k")


class SearchOptionsOverrides(BaseModel):
    """Advanced: search options of an evaluation. Empty or null: the worker's search settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    min_score: float | None = _setting("search_min_score")
    ef_search: int | None = _setting("search_ef_search")
    rrf_k: int | None = _setting("search_rrf_k")


class ParameterError(ValueError):
    """A flow parameter the server could not check (a path, a settings key) is wrong."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"parameter {parameter!r}: {message}")
        self.parameter = parameter


def checked_overrides(settings_overrides: SettingsOverrides | Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides that are set, as Settings keyword arguments; a key outside SettingsOverrides
    (a secret, a worker-only setting, a typo) is refused without echoing its value."""
    if settings_overrides is None:
        return {}
    if not isinstance(settings_overrides, SettingsOverrides):
        for key in settings_overrides:
            if key in WORKER_ONLY_SETTINGS:
                raise ParameterError(
                    "settings_overrides",
                    f"{key} is set on the worker (its environment), never in parameters, which "
                    "Prefect stores in plain text",
                )
            if key not in SettingsOverrides.model_fields:
                raise ParameterError("settings_overrides", f"{key!r} is not a setting a run may change")
        settings_overrides = SettingsOverrides.model_validate(dict(settings_overrides))
    return settings_overrides.model_dump(exclude_none=True)


def chosen(value: str | None) -> str | None:
    """A choice as the settings take it: None for `environment` (or None), else the value."""
    return None if value in (None, ENVIRONMENT) else value


def run_settings(
    profile: str | None,
    settings_overrides: SettingsOverrides | Mapping[str, Any] | None,
    **choices: Any,
) -> Settings:
    """Settings for one flow run: profile, environment, overrides, then the typed parameters."""
    overrides = checked_overrides(settings_overrides)
    for parameter, value in choices.items():
        if isinstance(value, str):
            value = chosen(value)
        if value is not None:
            overrides[SETTING_FOR_PARAMETER[parameter]] = tuple(value) if isinstance(value, list) else value
    return load_settings(chosen(profile), **overrides)


def existing_folder(source: str) -> Path:
    """The source folder, checked on the machine that runs the flow before any work starts."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ParameterError("source", f"{source} is not a folder on the machine running this flow")
    return folder


def without_arg(docstring: str, name: str) -> str:
    """The `Args:` block of a flow's docstring without the line of one argument.

    A flow that fixes one of another flow's parameters shows the rest of its form with
    the same descriptions (Prefect reads them from this block).
    """
    block = docstring[docstring.index("    Args:") :]
    return "\n".join(line for line in block.splitlines() if not line.startswith(f"        {name}:"))


def without_parameter(flow_fn: Callable[..., Any], like: Callable[..., Any], name: str) -> None:
    """Give `flow_fn`, which takes `**parameters`, the signature of `like` less one parameter.

    Prefect builds the form, checks each run and binds the call from the signature, so two
    flows that share their parameters declare them once. They become keyword-only, which is
    how Prefect then passes them to `**parameters`.
    """
    signature = inspect.signature(like, eval_str=True)  # types, not the strings of lazy annotations
    kept = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
        if p.name != name
    ]
    flow_fn.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    flow_fn.__annotations__ = {p.name: p.annotation for p in kept} | {"return": signature.return_annotation}
