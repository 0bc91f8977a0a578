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

__all__ = [
    "ABORT_BEGIN",
    "APPEND_EVENTS",
    "BEGIN_TURN",
    "CREATE",
    "FINISH_TURN",
    "FOLLOW_LOG",
    "MARK_PENDING",
    "REHYDRATE",
    "RENEW_TURN",
    "RESERVE_SEQS",
    "RESUME",
    "TURN_STATE",
]

# Sequence numbers (lines marked `-- seq`). The meta hash holds `seq`, the last
# seq handed out and recorded, and `seq_top`, the highest seq a turn in flight
# may have handed out without a round trip (its reservation: SEQ_RESERVE
# above its last recorded event). A turn numbers its events in memory; its
# event-log appends move `seq` up and keep the reservation ahead; its finish
# sets both to its last seq. A new turn starts above both, so a turn that died
# mid-answer is never renumbered over (a jump of at most one reservation).
#
# The event log (`kr:{t:s}:events`, a stream whose entry ids are `<seq>-1`)
# holds each logged event's bytes (`e`) and time (`t`); it is trimmed to a
# length and an age, and `log_floor` in meta is the highest seq trimmed away.
_APPEND = """
local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function append_events(events, meta, first, now, maxlen, max_age)
  local last = 0
  local tail = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)
  if #tail > 0 then last = seq_of(tail[1][1]) end
  local i = first
  while ARGV[i] do
    local s = tonumber(ARGV[i])
    if s > last then
      redis.call('XADD', events, s .. '-1', 't', now, 'e', ARGV[i + 1])
      last = s
    end
    i = i + 2
  end
  local floor = tonumber(redis.call('HGET', meta, 'log_floor') or '0')
  local before = floor
  local excess = redis.call('XLEN', events) - maxlen
  if excess > 0 then
    local old = redis.call('XRANGE', events, '-', '+', 'COUNT', excess)
    floor = math.max(floor, seq_of(old[#old][1]))
  end
  for _ = 1, 64 do
    local first_entry = redis.call('XRANGE', events, '(' .. floor .. '-1', '+', 'COUNT', 1)
    if #first_entry == 0 or tonumber(first_entry[1][2][2]) >= now - max_age then break end
    floor = seq_of(first_entry[1][1])
  end
  if floor > before then
    redis.call('XTRIM', events, 'MINID', (floor + 1) .. '-0')
    redis.call('HSET', meta, 'log_floor', floor)
  end
  return last
end
"""

CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now,
           'metadata', ARGV[1], 'seq', 0, 'seq_top', 0, 'turns', 0)  -- seq
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
  if KEYS[4] then  -- outbox
    redis.call('XADD', KEYS[4], '*', 'd', cjson.encode({k = 's', metadata = merged, ts = now,
      ep = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')}))
  end
end
redis.call('HSET', KEYS[1], 'updated_at', now)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
local missed = {}
if ARGV[3] ~= '' then  -- seq: the resume cursor; a rehydrated session continues above it
  local after = tonumber(ARGV[3])
  local top = math.max(tonumber(redis.call('HGET', KEYS[1], 'seq') or '0'),
                       tonumber(redis.call('HGET', KEYS[1], 'seq_top') or '0'))
  if after > top and redis.call('HGET', KEYS[1], 'rehydrated') == '1' then
    redis.call('HSET', KEYS[1], 'seq', after, 'seq_top', after)
  end
  missed = redis.call('XRANGE', KEYS[3], (after + 1) .. '-0', '+')
end
return {'resumed', redis.call('HGETALL', KEYS[1]), redis.call('LLEN', KEYS[2]), missed}
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
-- A person owns the session (handoff/): nothing here, the message goes to them.
local owner = redis.call('HGET', meta, 'owner')
if owner and not (r and r.status == 'done') then return {'human', owner} end
if r then
  if r.status == 'done' then
    if locked then return {'busy', holder} end  -- seq: a replay never interleaves a turn
    local base = math.max(tonumber(redis.call('HGET', meta, 'seq') or '0'),
                          tonumber(redis.call('HGET', meta, 'seq_top') or '0'))
    redis.call('HSET', meta, 'seq', base + ARGV[8], 'seq_top', base + ARGV[8])
    return {'replay', rec, base}
  end
  if r.status == 'running' and locked and holder == r.turn_id then
    if r.attempt ~= attempt then
      return {'running', rec, tonumber(redis.call('HGET', meta, 'turn_base') or '0')}  -- seq
    end
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
  local n = redis.call('HINCRBY', meta, 'turns', 1)
  turn_id = 't' .. n
  seq = math.max(tonumber(redis.call('HGET', meta, 'seq') or '0'),  -- seq
                 tonumber(redis.call('HGET', meta, 'seq_top') or '0'))
  redis.call('HSET', meta, 'seq', seq, 'seq_top', seq + tonumber(ARGV[7]), 'turn_base', seq)
  redis.call('HSET', meta, 'inflight', turn_id,
             'inflight_until', now + tonumber(ARGV[6]), 'inflight_cmid', cmid, 'updated_at', now)
  redis.call('HSET', turns, cmid, cjson.encode(
    {turn_id = turn_id, status = 'running', attempt = attempt, seq = seq}))
  -- A retry of a message whose turn failed: the message is stored already,
  -- unless its only record is an aborted begin's (nomsg).
  if not r or r.nomsg then
    local msg = {role = 'user', text = text, turn_id = turn_id, cmid = cmid, ts = now}
    if ARGV[9] and ARGV[9] ~= '' then msg.intent = ARGV[9] end
    if ARGV[11] and ARGV[11] ~= '' then  -- signals: sentiment, router confidence
      for k, v in pairs(cjson.decode(ARGV[11])) do msg[k] = v end
    end
    redis.call('RPUSH', hist, cjson.encode(msg))
    redis.call('LTRIM', hist, -tonumber(ARGV[3]), -1)
  end
  if KEYS[4] then  -- outbox
    redis.call('XADD', KEYS[4], '*', 'd', cjson.encode({
      ep = tonumber(redis.call('HGET', meta, 'epoch') or '0'),
      k = 'u', turn = n, turn_id = turn_id, cmid = cmid, text = text, intent = ARGV[9] or '',
      ts = now, seq = seq + tonumber(ARGV[7])}))
  end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
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

FINISH_TURN = (
    _APPEND
    + """
local meta, hist, turns, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function release()
  if redis.call('HGET', meta, 'inflight') == ARGV[2] then
    redis.call('HDEL', meta, 'inflight', 'inflight_until', 'inflight_cmid', 'turn_base')
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
-- seq: the turn's unlogged events and its terminal one go into the log now, so
-- the log is complete when the lease is released; unused reservation is handed back.
append_events(events, meta, 13, now, tonumber(ARGV[6]), tonumber(ARGV[12]))
local last = tonumber(ARGV[7])
local head = tonumber(redis.call('HGET', meta, 'seq') or '0')
if last > head then redis.call('HSET', meta, 'seq', last) end
if redis.call('HGET', meta, 'inflight') == ARGV[2] then
  redis.call('HSET', meta, 'seq_top', math.max(last, head))
end
release()
redis.call('HSET', meta, 'updated_at', now)
if KEYS[5] then  -- outbox
  local out = cjson.decode(ARGV[11])
  out.ts = now
  out.ep = tonumber(redis.call('HGET', meta, 'epoch') or '0')
  redis.call('XADD', KEYS[5], '*', 'd', cjson.encode(out))
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[9]) end
return {'applied'}
"""
)

# The event log: append a turn's events (KEYS meta, events, [outbox]; ARGV turn
# id or '', SEQ_RESERVE, max length, max age ms, ttl ms, then seq/bytes pairs).
# While the turn holds the session, its reservation is kept ahead of its last
# logged event (and PostgreSQL told of it, so a rehydrated session numbers above).
APPEND_EVENTS = (
    _APPEND
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = append_events(KEYS[2], KEYS[1], 6, now, tonumber(ARGV[3]), tonumber(ARGV[4]))
local head = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if last > head then redis.call('HSET', KEYS[1], 'seq', last) end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'inflight') == ARGV[1] then
  local top = tonumber(redis.call('HGET', KEYS[1], 'seq_top') or '0')
  local reserve = tonumber(ARGV[2])
  if last + reserve / 2 > top then
    top = last + reserve
    redis.call('HSET', KEYS[1], 'seq_top', top)
    if KEYS[3] then  -- outbox
      redis.call('XADD', KEYS[3], '*', 'd', cjson.encode({k = 'q', seq = top, ts = now,
        ep = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')}))
    end
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return last
"""
)

# A follower of a turn running elsewhere reads the log after its cursor, and
# says it is watching (the owner's detach grace does not cancel a watched turn).
# KEYS meta, events; ARGV after seq, watch ms (0: not watching), most entries.
FOLLOW_LOG = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], 'watch_until', now + ARGV[2]) end
local holder = redis.call('HGET', KEYS[1], 'inflight') or ''
if holder ~= '' and tonumber(redis.call('HGET', KEYS[1], 'inflight_until') or '0') <= now then
  holder = ''
end
return {'ok', holder, redis.call('XRANGE', KEYS[2], (tonumber(ARGV[1]) + 1) .. '-0', '+',
                                 'COUNT', ARGV[3])}
"""

# Reserve `ARGV[1]` seqs above everything handed out (KEYS meta); returns the base.
RESERVE_SEQS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local base = math.max(tonumber(redis.call('HGET', KEYS[1], 'seq') or '0'),
                      tonumber(redis.call('HGET', KEYS[1], 'seq_top') or '0'))
redis.call('HSET', KEYS[1], 'seq', base + ARGV[1], 'seq_top', base + ARGV[1])
return base
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
           'seq', ARGV[4], 'seq_top', ARGV[4], 'turns', ARGV[5], 'rehydrated', 1,
           'epoch', ARGV[10])
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
