-- 003: durable, run-keyed staging, and what each document was chunked with.
--
-- A run prepares its rows (in shards, on any machine) into these tables under
-- its own run key, then one load transaction swaps them in and deletes them.
-- They are UNLOGGED: staging is rebuilt by a rerun, never recovered.

-- What each stored document was chunked with (chunker, cap, token counter); a
-- change re-chunks the document as a content change does. NULL: not recorded.
ALTER TABLE documents ADD COLUMN IF NOT EXISTS chunk_config text;

-- One row per run in progress. The run's coordinating session holds the advisory
-- lock (7406, lock_id) while it lives; a row whose lock nobody holds belongs to a
-- run that died, and the next run to take the load lock removes its staging rows.
CREATE UNLOGGED TABLE IF NOT EXISTS ingest_stage_runs (
    run_key     uuid        PRIMARY KEY,
    lock_id     integer     GENERATED ALWAYS AS IDENTITY UNIQUE,
    source      text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now()
);

CREATE UNLOGGED TABLE IF NOT EXISTS ingest_stage_documents (
    run_key       uuid    NOT NULL,
    shard         integer NOT NULL,
    path          text    NOT NULL,
    namespace     text    NOT NULL,
    title         text    NOT NULL,
    description   text,
    tags          text[]  NOT NULL,
    concept_keys  text[]  NOT NULL,
    frontmatter   jsonb   NOT NULL,
    content_hash  bytea   NOT NULL,
    planned_hash  bytea,            -- the stored hash the plan saw; NULL for a new file
    chunk_config  text    NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_stage_documents_run ON ingest_stage_documents (run_key, shard);

CREATE UNLOGGED TABLE IF NOT EXISTS ingest_stage_chunks (
    run_key       uuid    NOT NULL,
    shard         integer NOT NULL,
    path          text    NOT NULL,
    ordinal       integer NOT NULL,
    heading_path  text[]  NOT NULL,
    content       text    NOT NULL,
    embed_hash    bytea   NOT NULL,
    token_count   integer NOT NULL,
    metadata      jsonb   NOT NULL
);
CREATE INDEX IF NOT EXISTS ingest_stage_chunks_run ON ingest_stage_chunks (run_key, shard);
