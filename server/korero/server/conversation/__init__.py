"""The conversation engine: sessions and turns, independent of any transport.

`engine` (sessions, starting turns, draining), `turn` (one turn in flight and
its subscribers), `runner` (a turn's lifecycle: cache, context, generation,
persistence), `generation` (the upstream call with retries and timeouts),
`early` (the upstream request sent while the turn's Redis round trips run),
`validation` (input rules), `wire` (stored records as protobuf),
`coalesce` (merging text deltas), `eventlog` (a turn's events into the
session's replay log, for resuming from a cursor) and `records` (a
session's PostgreSQL side: rehydration, history paging, deletion).
"""
