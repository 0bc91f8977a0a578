"""The session store's Lua scripts (each one atomic, one round trip).

Key and argument order is part of each script's contract with `sessions.py`.
"""

from __future__ import annotations

__all__ = [
    "ABORT_BEGIN",
    "BEGIN_TURN",
    "CREATE",
    "FINISH_TURN",
    "RENEW_TURN",
    "RESUME",
    "TURN_STATE",
]

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
local cmid, text, attempt = ARGV[1], ARGV[2], ARGV[10]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
local holder = redis.call('HGET', meta, 'inflight')
local locked = holder and tonumber(redis.call('HGET', meta, 'inflight_until') or '0') > now
if holder and not locked then
  -- The holder's lease ran out (its instance died or stalled): its turn failed.
  local hcmid = redis.call('HGET', meta, 'inflight_cmid')
  local hrec = hcmid and redis.call('HGET', turns, hcmid)
  if hrec then
    local h = cjson.decode(hrec)
    if h.status == 'running' and h.turn_id == holder then
      redis.call('HSET', turns, hcmid, cjson.encode(
        {turn_id = holder, status = 'failed', finish_reason = 'TURN_ORPHANED'}))
    end
  end
  redis.call('HDEL', meta, 'inflight', 'inflight_until', 'inflight_cmid')
  holder = nil
end
local rec = redis.call('HGET', turns, cmid)
local r = rec and cjson.decode(rec)
if r then
  if r.status == 'done' then
    return {'replay', rec, redis.call('HINCRBY', meta, 'seq', ARGV[8]) - ARGV[8]}
  end
  if r.status == 'running' and locked and holder == r.turn_id then
    if r.attempt ~= attempt then return {'running', rec} end
  elseif r.attempt == attempt then
    return {'aborted'}  -- this very attempt was given up (see ABORT_BEGIN)
  elseif locked then
    return {'busy', holder}
  end
elseif locked then
  return {'busy', holder}
end
local turn_id, seq
if r and r.status == 'running' and r.attempt == attempt then
  turn_id, seq = r.turn_id, r.seq  -- the same attempt delivered twice: same answer
else
  turn_id = 't' .. redis.call('HINCRBY', meta, 'turns', 1)
  seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
  redis.call('HSET', meta, 'seq', seq + tonumber(ARGV[7]), 'inflight', turn_id,
             'inflight_until', now + tonumber(ARGV[6]), 'inflight_cmid', cmid, 'updated_at', now)
  redis.call('HSET', turns, cmid, cjson.encode(
    {turn_id = turn_id, status = 'running', attempt = attempt, seq = seq}))
  -- A retry of a message whose turn failed: the message is stored already,
  -- unless its only record is an aborted begin's (nomsg).
  if not r or r.nomsg then
    local msg = {role = 'user', text = text, turn_id = turn_id, cmid = cmid, ts = now}
    if ARGV[9] and ARGV[9] ~= '' then msg.intent = ARGV[9] end
    redis.call('RPUSH', hist, cjson.encode(msg))
    redis.call('LTRIM', hist, -tonumber(ARGV[3]), -1)
  end
end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[5]) end
return {'started', turn_id, seq, redis.call('HGETALL', meta),
        redis.call('LRANGE', hist, -tonumber(ARGV[4]), -1), redis.call('LLEN', hist)}
"""

RENEW_TURN = """
if redis.call('HGET', KEYS[1], 'inflight') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'inflight_until', now + tonumber(ARGV[2]))
return 1
"""

ABORT_BEGIN = """
local meta, turns = KEYS[1], KEYS[2]
local cmid, attempt = ARGV[1], ARGV[2]
local rec = redis.call('HGET', turns, cmid)
if not rec then
  if redis.call('EXISTS', meta) == 0 then return 'missing' end
  -- The begin has not run (yet): a tombstone makes it refuse if it arrives late.
  redis.call('HSET', turns, cmid, cjson.encode({turn_id = '', status = 'failed',
    finish_reason = 'STORE_UNAVAILABLE', attempt = attempt, nomsg = true}))
  redis.call('PEXPIRE', turns, ARGV[3])
  return 'tombstone'
end
local r = cjson.decode(rec)
if r.attempt ~= attempt then return 'other' end
if r.status ~= 'running' then return 'settled' end
redis.call('HSET', turns, cmid, cjson.encode({turn_id = r.turn_id, status = 'failed',
  finish_reason = 'STORE_UNAVAILABLE', attempt = attempt}))
if redis.call('HGET', meta, 'inflight') == r.turn_id then
  redis.call('HDEL', meta, 'inflight', 'inflight_until', 'inflight_cmid')
end
return 'aborted'
"""

TURN_STATE = """
local rec = redis.call('HGET', KEYS[2], ARGV[1])
local holder = redis.call('HGET', KEYS[1], 'inflight')
local live = 0
if holder then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(redis.call('HGET', KEYS[1], 'inflight_until') or '0') > now then live = 1 end
end
return {rec or '', holder or '', live}
"""

FINISH_TURN = """
local meta, hist, turns = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function release()
  if redis.call('HGET', meta, 'inflight') == ARGV[2] then
    redis.call('HDEL', meta, 'inflight', 'inflight_until', 'inflight_cmid')
  end
end
local rec = redis.call('HGET', turns, ARGV[1])
local r = rec and cjson.decode(rec)
if not r or r.turn_id ~= ARGV[2] then
  release()
  return {'lost'}  -- declared failed and run again by another turn
end
if r.status ~= 'running' then
  release()
  return {'settled', rec}  -- a retried finish, or declared failed: never overwritten
end
if ARGV[5] ~= '' then
  local msg = cjson.decode(ARGV[5])
  msg.ts = now
  redis.call('RPUSH', hist, cjson.encode(msg))
  redis.call('LTRIM', hist, -tonumber(ARGV[8]), -1)
end
redis.call('HSET', turns, ARGV[1], ARGV[4])
if ARGV[10] and ARGV[10] ~= '' then redis.call('HSET', meta, 'summary', ARGV[10]) end
release()
if tonumber(redis.call('HGET', meta, 'seq') or '0') == tonumber(ARGV[6]) then
  redis.call('HSET', meta, 'seq', ARGV[7])
end
redis.call('HSET', meta, 'updated_at', now)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[9]) end
return {'applied'}
"""
