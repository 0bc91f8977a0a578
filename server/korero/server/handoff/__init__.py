"""Human handoff: when the bot hands a conversation to a person, and how they talk.

`triggers` (the escalation policy: which message hands over, and what the
bot says), `sentiment` (VADER per message, the trend over the last ones),
`store` + `scripts` (the tenant's agent desk and each session's relay log in
Redis, changed by Lua), `records` (handoffs, agents, relay entries),
`relay` (one pub/sub pattern per instance, and the feed that delivers a
session's handoff events to its customer stream), `service` (the engine's
hooks, opening handoffs, the queue's upkeep), `actions` (every agent action,
mixed into the service), `desk` (one connected agent, whatever carries
it) and `webhooks` (signed CRM events from a transactional outbox).
"""
