-- 002: search support. BM25 (lexical search) reads the number of chunks and
-- their mean length on every query; this index lets Postgres read both with an
-- index-only scan instead of scanning the wide rows.
CREATE INDEX IF NOT EXISTS chunks_token_count ON chunks (token_count);
