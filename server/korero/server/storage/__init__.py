"""State in Redis.

`keys` (the key layout, one place), `boundary` (the one Redis error boundary:
every redis-py exception becomes a `KoreroError`), `scripts` (several Lua
scripts in one round trip), `records` (stored sessions, messages, turn
records) and `sessions` (the `SessionStore`).
"""
