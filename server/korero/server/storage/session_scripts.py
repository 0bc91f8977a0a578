"""The session store's Lua scripts (each one atomic, one round trip).

Key and argument order is part of each script's contract with `sessions.py`.

Durability: every script that changes what PostgreSQL keeps (a session's
metadata, a user message, a turn's outcome) also appends an entry to the
session's outbox stream, its last key, in the same atomic step; the outbox
writer (`outbox.py`) applies those entries to PostgreSQL. The outbox key never
gets the session TTL: it lives until the writer has drained it. Those lines
are marked `-- outbox`.
"""

from __future__ import annotations

__all__ = ["BEGIN_TURN", "CREATE", "FINISH_TURN", "MARK_PENDING", "REHYDRATE", "RESUME"]

CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now,
           'metadata', ARGV[1], 'seq', 1, 'turns', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[2] then  -- outbox
  redis.call('XADD', KEYS[2], '*', 'd', cjson.encode({k = 's', metadata = ARGV[1], ts = now}))
end
return {'created', redis.call('HGETALL', KEYS[1])}
"""

RESUME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
if ARGV[1] ~= '' then
  local current = cjson.decode(redis.call('HGET', KEYS[1], 'metadata') or '{}')
  local update = cjson.decode(ARGV[1])
  for k, v in pairs(update) do
    if k == 'attributes' and type(current[k]) == 'table' then
      for ak, av in pairs(v) do current[k][ak] = av end
    else
      current[k] = v
    end
  end
  local merged = cjson.encode(current)
  redis.call('HSET', KEYS[1], 'metadata', merged)
  if KEYS[3] then  -- outbox
    redis.call('XADD', KEYS[3], '*', 'd', cjson.encode({k = 's', metadata = merged, ts = now,
      ep = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')}))
  end
end
redis.call('HSET', KEYS[1], 'updated_at', now)
for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
return {'resumed', redis.call('HGETALL', KEYS[1]), redis.call('LLEN', KEYS[2])}
"""

BEGIN_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local cmid, text = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
local holder = redis.call('HGET', meta, 'inflight')
local locked = holder and tonumber(redis.call('HGET', meta, 'inflight_until') or '0') > now
local rec = redis.call('HGET', turns, cmid)
if rec then
  local r = cjson.decode(rec)
  if r.status == 'done' then
    return {'replay', rec, redis.call('HINCRBY', meta, 'seq', ARGV[8]) - ARGV[8]}
  end
  if r.status == 'running' and locked and holder == r.turn_id then
    return {'running', rec}
  end
end
if locked then return {'busy', holder} end
local n = redis.call('HINCRBY', meta, 'turns', 1)
local turn_id = 't' .. n
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
redis.call('HSET', meta, 'seq', seq + tonumber(ARGV[7]), 'inflight', turn_id,
           'inflight_until', now + tonumber(ARGV[6]), 'updated_at', now)
redis.call('HSET', turns, cmid, cjson.encode({turn_id = turn_id, status = 'running'}))
local last = redis.call('LINDEX', hist, -1)
if not (rec and last and cjson.decode(last).cmid == cmid) then
  local msg = {role = 'user', text = text, turn_id = turn_id, cmid = cmid, ts = now}
  if ARGV[9] and ARGV[9] ~= '' then msg.intent = ARGV[9] end
  redis.call('RPUSH', hist, cjson.encode(msg))
  redis.call('LTRIM', hist, -tonumber(ARGV[3]), -1)
end
if KEYS[4] then  -- outbox
  redis.call('XADD', KEYS[4], '*', 'd', cjson.encode({
    ep = tonumber(redis.call('HGET', meta, 'epoch') or '0'),
    k = 'u', turn = n, turn_id = turn_id, cmid = cmid, text = text, intent = ARGV[9] or '',
    ts = now, seq = seq}))
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return {'started', turn_id, seq, redis.call('HGETALL', meta),
        redis.call('LRANGE', hist, -tonumber(ARGV[4]), -1), redis.call('LLEN', hist)}
"""

FINISH_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A session lost under the turn (Redis restarted empty) is not brought back half.
if redis.call('EXISTS', meta) == 0 then return 0 end
if ARGV[5] ~= '' then
  local msg = cjson.decode(ARGV[5])
  msg.ts = now
  redis.call('RPUSH', hist, cjson.encode(msg))
  redis.call('LTRIM', hist, -tonumber(ARGV[8]), -1)
end
redis.call('HSET', turns, ARGV[1], ARGV[4])
if ARGV[10] and ARGV[10] ~= '' then redis.call('HSET', meta, 'summary', ARGV[10]) end
if redis.call('HGET', meta, 'inflight') == ARGV[2] then
  redis.call('HDEL', meta, 'inflight', 'inflight_until')
end
if tonumber(redis.call('HGET', meta, 'seq') or '0') == tonumber(ARGV[6]) then
  redis.call('HSET', meta, 'seq', ARGV[7])
end
redis.call('HSET', meta, 'updated_at', now)
if KEYS[4] then  -- outbox
  local out = cjson.decode(ARGV[11])
  out.ts = now
  out.ep = tonumber(redis.call('HGET', meta, 'epoch') or '0')
  redis.call('XADD', KEYS[4], '*', 'd', cjson.encode(out))
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[9]) end
return 1
"""

# Durability: bring a session lost from Redis back whole from PostgreSQL's copy.
# KEYS: meta, history, turns. ARGV: created_at, updated_at (ms), metadata JSON,
# seq, turns, summary JSON or '', ttl ms, JSON list of history entries (each a
# JSON string), JSON object client_message_id -> turn record (a JSON string),
# the epoch PostgreSQL gave this rehydration (outbox entries carry it: a write
# of an older epoch, read before a crash, is refused there).
REHYDRATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'created_at', ARGV[1], 'updated_at', ARGV[2], 'metadata', ARGV[3],
           'seq', ARGV[4], 'turns', ARGV[5], 'rehydrated', 1, 'epoch', ARGV[10])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'summary', ARGV[6]) end
for _, m in ipairs(cjson.decode(ARGV[8])) do redis.call('RPUSH', KEYS[2], m) end
for cmid, rec in pairs(cjson.decode(ARGV[9])) do redis.call('HSET', KEYS[3], cmid, rec) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end
return 1
"""

# Durability: note that a session has outbox entries (KEYS[1] is the pending
# index). The score only grows, so the writer can tell whether anything was
# added while it drained.
MARK_PENDING = """
return redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])
"""
