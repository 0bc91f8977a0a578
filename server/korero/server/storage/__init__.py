"""State in Redis, history in PostgreSQL.

`keys` (the key layout, one place), `boundary` (the one Redis error boundary:
every redis-py exception becomes a `KoreroError`), `scripts` (several Lua
scripts in one round trip), `records` (stored sessions, messages, turn
records), `sessions` (the `SessionStore`) and `session_scripts` (its Lua);
`history` (the `HistoryStore` in PostgreSQL, with its own error boundary),
`outbox` (the writer that moves each session's outbox into it), `paging`
(ListMessages' page tokens and merge), `migrate` and `migrations/` (the
numbered SQL schema).
"""
