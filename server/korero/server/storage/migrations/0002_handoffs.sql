-- Human handoffs (handoff/): one row per handoff — requested, joined by an agent,
-- ended — and the messages exchanged while a person owned the conversation
-- (the bot's turns are in `messages`, 0001). `korero report` reads these with
-- `sessions` and `messages`. Every row carries its tenant, and every key and
-- index starts with it.

CREATE TABLE handoffs (
    tenant        text        NOT NULL,
    handoff_id    text        NOT NULL,
    session_id    text        NOT NULL,
    trigger       text        NOT NULL,   -- settings.HandoffTriggerName
    reason        text        NOT NULL DEFAULT '',
    queue         text        NOT NULL DEFAULT 'general',
    turn_id       text        NOT NULL DEFAULT '',   -- the bot turn that escalated, if one did
    requested_at  timestamptz NOT NULL,
    joined_at     timestamptz,                       -- the first agent joined
    ended_at      timestamptz,
    agent_id      text        NOT NULL DEFAULT '',
    agent_name    text        NOT NULL DEFAULT '',
    outcome       text        NOT NULL DEFAULT '',   -- returned_to_bot | closed
    disposition   text        NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, handoff_id)
);

CREATE INDEX handoffs_tenant_requested ON handoffs (tenant, requested_at);
CREATE INDEX handoffs_tenant_session ON handoffs (tenant, session_id);

CREATE TABLE handoff_messages (
    tenant            text        NOT NULL,
    session_id        text        NOT NULL,
    seq               bigint      NOT NULL,          -- its seq on the customer's stream
    handoff_id        text        NOT NULL,
    role              text        NOT NULL CHECK (role IN ('customer', 'agent')),
    author            text        NOT NULL DEFAULT '',   -- the agent's display name
    client_message_id text        NOT NULL DEFAULT '',
    text              text        NOT NULL,
    sentiment         real,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, session_id, seq)
);

CREATE INDEX handoff_messages_handoff ON handoff_messages (tenant, handoff_id);
