"""The session store's Lua scripts (each one atomic, one round trip).

Key and argument order is part of each script's contract with `sessions.py`.
"""

from __future__ import annotations

__all__ = ["BEGIN_TURN", "CREATE", "FINISH_TURN", "RESUME"]

CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now,
           'metadata', ARGV[1], 'seq', 1, 'turns', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
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
  redis.call('HSET', KEYS[1], 'metadata', cjson.encode(current))
end
redis.call('HSET', KEYS[1], 'updated_at', now)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[2]) end
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
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[5]) end
return {'started', turn_id, seq, redis.call('HGETALL', meta),
        redis.call('LRANGE', hist, -tonumber(ARGV[4]), -1), redis.call('LLEN', hist)}
"""

FINISH_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[9]) end
return 1
"""
