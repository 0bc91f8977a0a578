-- Human handoffs and per-turn facts: what `korero report` reads.
--
-- `handoffs` is one row per handoff (handoff/): requested, joined by an agent,
-- ended. `turn_facts` is one row per bot turn with what the report needs
-- (intent, outcome, time to first token, tokens, cache); it stands in for the
-- history tables of 0001 (sessions and messages) where those are not applied.
-- Every row carries its tenant, and every key and index starts with it.

CREATE TABLE IF NOT EXISTS handoffs (
    tenant        text        NOT NULL,
    handoff_id    text        NOT NULL,
    session_id    text        NOT NULL,
    trigger       text        NOT NULL,
    reason        text        NOT NULL DEFAULT '',
    queue         text        NOT NULL DEFAULT 'general',
    requested_at  timestamptz NOT NULL,
    joined_at     timestamptz,                       -- the first agent joined
    ended_at      timestamptz,
    agent_id      text        NOT NULL DEFAULT '',
    agent_name    text        NOT NULL DEFAULT '',
    outcome       text        NOT NULL DEFAULT '',   -- returned_to_bot | closed
    disposition   text        NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, handoff_id)
);

CREATE INDEX IF NOT EXISTS handoffs_tenant_requested ON handoffs (tenant, requested_at);

CREATE TABLE IF NOT EXISTS turn_facts (
    tenant         text             NOT NULL,
    session_id     text             NOT NULL,
    turn_id        text             NOT NULL,
    created_at     timestamptz      NOT NULL,
    intent         text             NOT NULL DEFAULT '',
    outcome        text             NOT NULL,        -- stop | length | cached | cancelled | error
    reason         text             NOT NULL DEFAULT '',
    ttft_ms        double precision,                 -- null: no text was sent
    duration_ms    double precision NOT NULL,
    input_tokens   integer          NOT NULL DEFAULT 0,
    output_tokens  integer          NOT NULL DEFAULT 0,
    cached         boolean          NOT NULL DEFAULT false,
    sentiment      real,
    escalated      boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, session_id, turn_id)
);

CREATE INDEX IF NOT EXISTS turn_facts_tenant_created ON turn_facts (tenant, created_at);
