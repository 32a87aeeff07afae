-- 001: the core schema. Embedding columns are not here: each registered model
-- gets its own `emb_<slug>` column and HNSW index, added when it is registered.

CREATE EXTENSION IF NOT EXISTS vector;

-- One row per source file.
CREATE TABLE documents (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source          text        NOT NULL,
    path            text        NOT NULL,           -- relative to the source root
    namespace       text        NOT NULL,
    title           text        NOT NULL,
    description     text,
    tags            text[]      NOT NULL DEFAULT '{}',
    concept_keys    text[]      NOT NULL DEFAULT '{}',
    frontmatter     jsonb       NOT NULL DEFAULT '{}',
    content_hash    bytea       NOT NULL,           -- sha256 of the file's bytes
    -- 'stale': the file is still there but failed to parse on the latest run;
    -- its previous chunks stay searchable until it is fixed.
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'stale')),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, path)
);

-- One row per chunk. A deleted document takes its chunks with it.
CREATE TABLE chunks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id     bigint      NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    ordinal         integer     NOT NULL,
    heading_path    text[]      NOT NULL DEFAULT '{}',
    content         text        NOT NULL,
    embed_hash      bytea       NOT NULL,           -- sha256 of the text that was embedded
    token_count     integer     NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',  -- title, headings, namespace, tags
    tsv             tsvector    GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, coalesce(metadata ->> 'title', '')), 'A')
        || setweight(to_tsvector('english'::regconfig, coalesce(metadata ->> 'headings', '')), 'B')
        || setweight(to_tsvector('english'::regconfig, content), 'C')
    ) STORED,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);

-- The registry of embedding models, one column of `chunks` each.
CREATE TABLE embedding_models (
    slug                 text        PRIMARY KEY CHECK (slug ~ '^[a-z][a-z0-9_]{0,43}$'),
    provider             text        NOT NULL CHECK (provider IN ('openai', 'sentence-transformers', 'hash')),
    model                text        NOT NULL,
    dimensions           integer     NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    column_name          text        NOT NULL UNIQUE CHECK (column_name = 'emb_' || slug),
    precision            text        NOT NULL CHECK (precision IN ('vector', 'halfvec')),
    hnsw_m               integer     NOT NULL DEFAULT 16,
    hnsw_ef_construction integer     NOT NULL DEFAULT 64,
    status               text        NOT NULL CHECK (status IN ('backfilling', 'ready', 'active', 'retired')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, model, dimensions)
);
-- At most one model is the primary one.
CREATE UNIQUE INDEX embedding_models_one_active ON embedding_models ((true)) WHERE status = 'active';

-- (model_key, sha256(embed text)) -> vector. The column is untyped so every
-- model shares the table; model_key names provider, model and dimensions.
CREATE TABLE embedding_cache (
    model_key       text        NOT NULL,
    content_hash    bytea       NOT NULL,
    embedding       vector      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_key, content_hash)
);

CREATE TABLE ingest_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source          text        NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    summary         jsonb       NOT NULL
);

CREATE TABLE ingest_failures (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint      NOT NULL REFERENCES ingest_runs (id) ON DELETE CASCADE,
    path            text        NOT NULL,
    reason          text        NOT NULL
);
CREATE INDEX ingest_failures_run ON ingest_failures (run_id);
