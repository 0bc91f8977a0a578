-- An answer's tool calls (name, status, duration_ms, source, cached; never arguments
-- or results), as ListMessages shows them.
ALTER TABLE messages ADD COLUMN tool_calls jsonb NOT NULL DEFAULT '[]';
