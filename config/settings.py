"""One typed, frozen settings object, built at the flow or CLI entry and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tasks.providers import ProviderName as ProviderName  # the one registry names the providers

CONFIG_DIR = Path(__file__).resolve().parent
PROFILES = ("dev", "prod")

LocalPrecision = Literal["auto", "fp32", "bf16"]
ChunkerName = Literal["headings", "tokens"]
IndexStrategy = Literal["auto", "drop", "keep"]


def _env(name: str) -> Any:
    """Accept both the plain name (EMBEDDING_MODEL) and the prefixed one."""
    return AliasChoices(name, f"RAGINGEST_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGINGEST_", frozen=True, extra="ignore", populate_by_name=True
    )

    # --- where things live -------------------------------------------------
    database_url: SecretStr | None = Field(default=None, validation_alias=_env("DATABASE_URL"))
    """Postgres to use. Unset: an embedded Postgres under `home`."""
    home: Path = Field(
        default=Path.home() / ".local" / "share" / "ragingest",
        validation_alias="RAGINGEST_HOME",
    )
    """Data folder of the embedded Postgres (RAGINGEST_HOME)."""

    # --- the embedding model -----------------------------------------------
    embedding_provider: ProviderName = Field(
        default="sentence-transformers", validation_alias=_env("EMBEDDING_PROVIDER")
    )
    """openai | sentence-transformers | hash (deterministic, no model; for tests and dry runs)."""
    embedding_model: str = Field(default="all-MiniLM-L6-v2", validation_alias=_env("EMBEDDING_MODEL"))
    """The model name given to the provider."""
    embedding_dimensions: int = Field(
        default=384, ge=1, le=16000, validation_alias=_env("EMBEDDING_DIMENSIONS")
    )
    """Vector size; checked on every response."""
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=_env("OPENAI_API_KEY"))
    """Key for the openai provider. Never logged."""
    openai_base_url: str | None = Field(default=None, validation_alias=_env("OPENAI_BASE_URL"))
    """Any OpenAI-compatible endpoint (Azure, Ollama, vLLM). Unset: api.openai.com."""
    embed_concurrency: int = Field(default=4, ge=1, le=64)
    """Embedding requests in flight at once."""
    embed_batch_inputs: int = Field(default=128, ge=1, le=2048)
    """Most texts in one embedding request."""
    embed_batch_tokens: int = Field(default=60_000, ge=256)
    """Most tokens in one embedding request."""
    embed_timeout_seconds: float = Field(default=60.0, gt=0)
    """Timeout of one embedding request."""
    embed_max_attempts: int = Field(default=8, ge=1)
    """Attempts per batch for transient failures (429, 5xx, timeouts)."""
    embed_max_backoff_seconds: float = Field(default=30.0, gt=0)
    """Longest wait between two attempts, Retry-After included."""
    requests_per_minute: int | None = Field(default=None, ge=1)
    """Request budget of the embedding API, shared by this run's batches."""
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Token budget of the embedding API."""
    embed_concurrency_limit: str | None = None
    """Name of a Prefect global concurrency limit each embedding request holds while in
    flight, so several flows share one API budget. Unset: none."""
    embed_rate_limit: str | None = None
    """Name of a Prefect global concurrency limit with slot decay (a rate limit); each
    embedding request takes one slot. Unset: none."""
    local_precision: LocalPrecision = "auto"
    """Arithmetic of the local model (RAGINGEST_LOCAL_PRECISION): bf16 runs it under bfloat16
    autocast; auto picks bf16 where the CPU has bf16 instructions or a CUDA device is present,
    fp32 elsewhere. bf16 vectors keep a cosine of at least 0.9999 to fp32, so both share the
    model's cache key."""
    cost_per_million_tokens: float = Field(default=0.0, ge=0)
    """Price used for the cost estimate in the summary (0.02 for text-embedding-3-small)."""

    # --- discovery and chunking --------------------------------------------
    include: Annotated[tuple[str, ...], NoDecode] = ("**/*.md", "**/*.mdx", "**/*.markdown")
    """Globs of files to ingest, relative to the source."""
    exclude: Annotated[tuple[str, ...], NoDecode] = ()
    """Globs of files to leave out; they win over `include`."""
    max_file_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    """Larger files are reported as failures and skipped."""
    follow_external_links: bool = False
    """Follow symlinks (to files or folders) whose target lies outside the source root. Off: they
    are listed as skipped and nothing behind them is read, so a link such as `kb/x.md -> /etc/passwd`
    never reaches the index."""
    chunker: ChunkerName = "headings"
    """headings: sections by Markdown headings; tokens: fixed token windows."""
    chunk_max_tokens: int = Field(default=512, ge=32)
    """Cap of the headings chunker; lowered to the model's input limit."""
    token_window: int = Field(default=400, ge=32)
    """Window size of the tokens chunker."""
    token_overlap: int = Field(default=50, ge=0)
    """Overlap between two windows of the tokens chunker."""
    stream_batch_chunks: int = Field(default=4000, ge=1)
    """Chunks prepared per step; bounds memory on large corpora."""
    shard_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """Bytes of new and changed files per shard: the unit of work a runner schedules and retries."""
    workers: int = Field(default=0, ge=0, le=256)
    """Prepare the shards on a local Dask cluster of this many processes, one thread each
    (RAGINGEST_WORKERS). 0: in this process."""
    dask_address: str | None = Field(default=None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$")
    """Prepare the shards on an existing Dask cluster, e.g. tcp://host:8786
    (RAGINGEST_DASK_ADDRESS). Its workers need the project, a DATABASE_URL and (with Prefect)
    a PREFECT_API_URL they can reach."""

    # --- loading and indexing ----------------------------------------------
    index_strategy: IndexStrategy = "auto"
    """auto | drop (drop HNSW, load, rebuild) | keep (load with the index online)."""
    auto_drop_fraction: float = Field(default=0.25, gt=0, le=1)
    """`auto` drops the index when the rows written plus deleted reach this share of the table.
    0.25: the break-even bench/bulk.py measured (24% at 20k chunks; keep still won at 20%)."""
    auto_drop_min_rows: int = Field(default=2000, ge=0)
    """…and at least this many rows (a tiny first load keeps the index)."""
    hnsw_m: int = Field(default=16, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000)
    maintenance_work_mem: str = Field(default="1GB", pattern=r"^\d+(kB|MB|GB)$")
    """Memory for the HNSW build."""
    max_parallel_maintenance_workers: int = Field(default=2, ge=0, le=64)
    """Parallel workers for the HNSW build."""
    lock_timeout_seconds: float = Field(default=600.0, ge=0)
    """How long a run waits for another run's lock before giving up."""

    # --- search -------------------------------------------------------------
    search_min_score: float | None = Field(default=None, ge=-1, le=1)
    """Minimum cosine similarity of a search hit to the query (vector and hybrid modes; in
    hybrid, lexical candidates are held to it too). Unset: no floor."""
    search_ef_search: int = Field(default=40, ge=1, le=1000)
    """hnsw.ef_search for vector search (raised to the number of candidates asked for)."""
    search_rrf_k: int = Field(default=60, ge=1)
    """The k of Reciprocal Rank Fusion in hybrid search."""

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _split_globs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def model_key(self) -> str:
        return model_key(self.embedding_provider, self.embedding_model, self.embedding_dimensions)


def model_key(provider: str, model: str, dimensions: int) -> str:
    """Names provider, model and dimensions, so no model reuses another's vectors."""
    return f"{provider}:{model}:{dimensions}"


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Settings from a profile file (config/<profile>.env), then the environment, then overrides."""
    env_file: Path | None = None
    if profile is not None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        env_file = CONFIG_DIR / f"{profile}.env"
    return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
