-- Sessions and their messages: the system of record (Redis holds the hot copy).
-- Every row carries its tenant, and every key and index starts with it.

CREATE TABLE sessions (
    tenant        text        NOT NULL,
    session_id    text        NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    meta_version  text        NOT NULL DEFAULT '',   -- outbox entry id of the metadata
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    turn_count    integer     NOT NULL DEFAULT 0,    -- highest turn number begun
    seq_high      bigint      NOT NULL DEFAULT 0,    -- every seq handed out is at most this
    summary       jsonb,                             -- summary of older turns (context/)
    PRIMARY KEY (tenant, session_id)
);

CREATE INDEX sessions_tenant_updated ON sessions (tenant, updated_at);

CREATE TABLE messages (
    tenant            text        NOT NULL,
    session_id        text        NOT NULL,
    turn_no           integer     NOT NULL,          -- n of turn id t<n>: the order
    role              text        NOT NULL CHECK (role IN ('user', 'assistant')),
    turn_id           text        NOT NULL,
    client_message_id text        NOT NULL DEFAULT '',
    text              text        NOT NULL,
    intent            text        NOT NULL DEFAULT '',
    model             text        NOT NULL DEFAULT '',
    finish_reason     text        NOT NULL DEFAULT '',
    usage             jsonb       NOT NULL DEFAULT '{}',
    citations         jsonb       NOT NULL DEFAULT '[]',
    timings           jsonb       NOT NULL DEFAULT '{}',
    cached            boolean     NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, session_id, turn_no, role)
);

-- A user message is stored once per client_message_id (the idempotency key).
CREATE UNIQUE INDEX messages_user_cmid
    ON messages (tenant, session_id, client_message_id) WHERE role = 'user';

-- And one answer per client_message_id: a retry after a crash replays it, never adds one.
CREATE UNIQUE INDEX messages_answer_cmid
    ON messages (tenant, session_id, client_message_id) WHERE role = 'assistant';

-- Fencing: a session rehydrated into Redis gets a new epoch; outbox writes of an
-- older epoch (read from a Redis that has since crashed) are refused.
ALTER TABLE sessions ADD COLUMN epoch integer NOT NULL DEFAULT 0;

-- A deleted session stays deleted: outbox writes read before the deletion are refused.
CREATE TABLE session_tombstones (
    tenant     text        NOT NULL,
    session_id text        NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id)
);
