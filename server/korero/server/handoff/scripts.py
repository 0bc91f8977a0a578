"""The handoff Lua scripts (each one atomic, one round trip).

Two key spaces, two kinds of script, because a script may only touch keys of
one Redis Cluster slot:

* the session's (`kr:{t:s}:…`): `RELAY_APPEND` claims, keeps or releases the
  session for a handoff (`owner` in the session hash: while it is set the bot
  does not answer), numbers customer-facing events with the session's `seq`
  (above any reservation, never while a bot turn holds the session), appends
  them to the relay log and to the session's event log (so a stream resumed
  from a cursor replays them), records relayed messages in the history,
  appends each customer and agent message to the session's outbox (KEYS[6],
  when PostgreSQL is on: `handoff_messages` rows, written by the outbox
  writer like the bot's turns, never apart from the Redis write), and
  publishes on the session's channel;
* the tenant desk's (`kr:{t:desk}:…`): every desk script starts with
  `_DESK_PRELUDE` and changes handoff records, queues and agents together,
  appending webhook deliveries to the outbox in the same step (a
  transactional outbox: a state change and its webhook are never apart).

Records are JSON in hashes; sets of ids are JSON objects (`{"id": 1}`), which
cjson round-trips whether empty or not. (Longer than 400 lines: it is Lua
source, one script per desk action.)
"""

from __future__ import annotations

__all__ = [
    "DESK_ACCEPT",
    "DESK_AGENT_JOIN",
    "DESK_AGENT_LEAVE",
    "DESK_AGENT_UPDATE",
    "DESK_DECLINE",
    "DESK_PICK",
    "DESK_RELEASE",
    "DESK_REQUEST",
    "DESK_TICK",
    "RELAY_APPEND",
]

RELAY_APPEND = """
local meta, hist, relay, turns, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local outbox = KEYS[6]  -- only when PostgreSQL is on
local mode, hid, ttl, maxlen, channel, cmid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
local owner = redis.call('HGET', meta, 'owner')
if mode == 'open' then
  if owner and owner ~= hid then return {'owned', owner} end
  redis.call('HSET', meta, 'owner', hid)  -- from now on no bot turn begins
elseif mode ~= 'any' then
  if owner ~= hid then return {'not_owner', owner or ''} end
end
-- seq: a bot turn still holding the session numbers its events from its own
-- reservation; numbering ours now could collide with it, so the caller waits.
local holder = redis.call('HGET', meta, 'inflight')
if holder and tonumber(redis.call('HGET', meta, 'inflight_until') or '0') > now and n > 0 then
  return {'busy', holder}
end
if cmid ~= '' then
  local rec = redis.call('HGET', turns, cmid)
  if rec then
    local r = cjson.decode(rec)
    if r.status == 'relayed' then return {'duplicate', tostring(r.seq)} end
  end
end
if mode == 'close' then redis.call('HDEL', meta, 'owner') end
local function varint(v)
  local out = {}
  repeat
    local b = v % 128
    v = math.floor(v / 128)
    if v > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until v == 0
  return table.concat(out)
end
local turn_id = 't' .. (redis.call('HGET', meta, 'turns') or '0')
local seq = math.max(tonumber(redis.call('HGET', meta, 'seq') or '0'),  -- seq
                     tonumber(redis.call('HGET', meta, 'seq_top') or '0'))
local out = {'ok'}
local epoch = tonumber(redis.call('HGET', meta, 'epoch') or '0')
for i = 0, n - 1 do
  local kind, ev, body, msg = ARGV[8 + i*5], ARGV[9 + i*5], ARGV[10 + i*5], ARGV[11 + i*5]
  local row = ARGV[12 + i*5]
  seq = seq + 1
  redis.call('XADD', relay, 'MAXLEN', '~', maxlen, '*',
             'seq', seq, 'kind', kind, 'hid', hid, 'ev', ev, 'body', body)
  if ev ~= '' then  -- the session's event log (resume): the event with its seq (field 3)
    redis.call('XADD', events, seq .. '-1', 't', now, 'e', ev .. string.char(24) .. varint(seq))
  end
  if msg ~= '' then
    local m = cjson.decode(msg)
    m.ts = now
    m.turn_id = turn_id
    redis.call('RPUSH', hist, cjson.encode(m))
  end
  if row ~= '' and outbox then  -- outbox: a `handoff_messages` row
    local r = cjson.decode(row)
    r.k, r.seq, r.hid, r.ts, r.ep = 'h', seq, hid, now, epoch
    redis.call('XADD', outbox, '*', 'd', cjson.encode(r))
  end
  out[#out + 1] = seq
end
if n > 0 then redis.call('HSET', meta, 'seq', seq, 'seq_top', seq) end
if cmid ~= '' then
  redis.call('HSET', turns, cmid,
             cjson.encode({turn_id = '', status = 'relayed', seq = out[2], handoff = hid}))
end
redis.call('HSET', meta, 'updated_at', now)
for i = 1, 5 do  -- not the outbox: it lives until the writer has drained it
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ttl) end
end
redis.call('PUBLISH', channel, out[#out] or 0)
return out
"""

# KEYS: handoffs, sessions, agents, stats, queues. ARGV[1] key prefix, ARGV[2] now (ms).
_DESK_PRELUDE = """
local H, S, A, ST, Q = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local function get(hid)
  local r = redis.call('HGET', H, hid)
  if r then return cjson.decode(r) end
  return nil
end
local function put(rec) redis.call('HSET', H, rec.id, cjson.encode(rec)) end
local function agent(id)
  if not id then return nil end
  local r = redis.call('HGET', A, id)
  if r then return cjson.decode(r) end
  return nil
end
local function put_agent(a) redis.call('HSET', A, a.id, cjson.encode(a)) end
local function qkey(q) return prefix .. 'queue:' .. q end
local function count(set)
  local c = 0
  for _ in pairs(set or {}) do c = c + 1 end
  return c
end
local function enqueue(rec)
  redis.call('ZADD', qkey(rec.queue), rec.requested, rec.id)
  redis.call('SADD', Q, rec.queue)
end
-- ARGV[i] = count, then (target, payload) pairs: the webhook outbox
local function outbox(i)
  local c = tonumber(ARGV[i] or '0')
  for j = 1, c do
    redis.call('RPUSH', prefix .. 'wh:' .. ARGV[i + 2*j - 1], ARGV[i + 2*j])
  end
  if c > 0 then redis.call('PUBLISH', prefix .. 'notify', 'wh') end
end
local function notify() redis.call('PUBLISH', prefix .. 'notify', 'desk') end
"""

# ARGV: 3 hid, 4 session, 5 record JSON, 6.. outbox
DESK_REQUEST = (
    _DESK_PRELUDE
    + """
local hid, session = ARGV[3], ARGV[4]
local existing = redis.call('HGET', S, session)
if existing then return {'exists', existing} end
local rec = cjson.decode(ARGV[5])
rec.id = hid
rec.session = session
rec.state = 'queued'
rec.requested = now
put(rec)
redis.call('HSET', S, session, hid)
enqueue(rec)
outbox(6)
notify()
return {'queued', cjson.encode(rec)}
"""
)

# ARGV: 3 offer ms, 4 stale ms (agents not seen for longer are gone), 5 grace ms.
# Returns {records now in grace (their agent went silent)..., '|', requeued records..., '|',
# offered hid, agent id, ...}.
DESK_TICK = (
    _DESK_PRELUDE
    + """
local offer_ms, stale_ms, grace_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
local agents = {}
local flat = redis.call('HGETALL', A)
for i = 1, #flat, 2 do agents[#agents + 1] = cjson.decode(flat[i + 1]) end
-- agents whose instance stopped answering: their conversations enter the grace period
for _, a in ipairs(agents) do
  if a.status ~= 'offline' and now - a.seen > stale_ms then
    a.status = 'offline'
    for hid in pairs(a.active) do
      local rec = get(hid)
      if rec and rec.agent == a.id and rec.state == 'active' then
        rec.state = 'grace'
        rec.grace_until = now + grace_ms
        put(rec)
        out[#out + 1] = cjson.encode(rec)
      end
    end
    put_agent(a)
  end
end
out[#out + 1] = '|'
local byid = {}
for _, a in ipairs(agents) do byid[a.id] = a end
flat = redis.call('HGETALL', H)
for i = 1, #flat, 2 do
  local rec = cjson.decode(flat[i + 1])
  if rec.state == 'offered' and (rec.offer_until or 0) <= now then
    local a = byid[rec.offered_to]
    if a then a.offers[rec.id] = nil; put_agent(a) end
    rec.declined = rec.declined or {}
    rec.declined[rec.offered_to] = 1
    rec.state = 'queued'
    rec.offered_to = nil
    rec.offer_until = nil
    put(rec)
  elseif rec.state == 'grace' and (rec.grace_until or 0) <= now then
    local a = byid[rec.agent]
    if a then a.active[rec.id] = nil; put_agent(a) end
    rec.state = 'queued'
    rec.agent = nil
    rec.agent_name = nil
    rec.grace_until = nil
    put(rec)
    enqueue(rec)
    out[#out + 1] = cjson.encode(rec)
  end
end
out[#out + 1] = '|'
local function load(a) return count(a.active) + count(a.offers) end
for _, q in ipairs(redis.call('SMEMBERS', Q)) do
  local ids = redis.call('ZRANGE', qkey(q), 0, -1)
  if #ids == 0 then redis.call('SREM', Q, q) end
  for _, hid in ipairs(ids) do
    local rec = get(hid)
    if rec == nil or (rec.state ~= 'queued' and rec.state ~= 'offered') then
      redis.call('ZREM', qkey(q), hid)
    elseif rec.state == 'queued' then
      local best = nil
      for pass = 1, 2 do
        for _, a in ipairs(agents) do
          local eligible = a.status == 'available' and now - a.seen <= stale_ms
            and (q == 'general' or (a.skills or {})[q]) and load(a) < (a.max or 1)
            and not (rec.declined or {})[a.id]
          if eligible and (best == nil or load(a) < load(best)
              or (load(a) == load(best) and (a.last or 0) < (best.last or 0))) then
            best = a
          end
        end
        -- everyone eligible passed on it: start the round again
        if best ~= nil or count(rec.declined) == 0 then break end
        rec.declined = {}
      end
      if best ~= nil then
        rec.state = 'offered'
        rec.offered_to = best.id
        rec.offer_until = now + offer_ms
        put(rec)
        best.offers[hid] = 1
        best.last = now
        put_agent(best)
        out[#out + 1] = hid
        out[#out + 1] = best.id
      end
    end
  end
end
if #out > 2 then notify() end
return out
"""
)

# ARGV: 3 hid, 4 agent id, 5 agent name, 6 mode ('offer' | 'pick'), 7 default wait ms, 8.. outbox
DESK_ACCEPT = (
    _DESK_PRELUDE
    + """
local hid, id, name, mode = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local rec = get(hid)
if not rec then return {'missing'} end
local a = agent(id)
if not a then return {'no_agent'} end
if rec.state == 'active' or rec.state == 'grace' then
  if rec.agent == id then return {'already', cjson.encode(rec)} end
  return {'taken', rec.agent_name or ''}
end
if mode == 'offer' and not (rec.state == 'offered' and rec.offered_to == id) then
  return {'not_offered'}
end
if rec.state == 'offered' and rec.offered_to ~= id then
  local other = agent(rec.offered_to)
  if other then other.offers[hid] = nil; put_agent(other) end
end
redis.call('ZREM', qkey(rec.queue), hid)
rec.state = 'active'
rec.agent = id
rec.agent_name = name
rec.offered_to = nil
rec.offer_until = nil
rec.grace_until = nil
local first = rec.joined == nil
if first then
  rec.joined = now
  local waited = now - rec.requested
  local old = tonumber(redis.call('HGET', ST, 'ewma_wait_ms') or ARGV[7])
  redis.call('HSET', ST, 'ewma_wait_ms', math.floor(old * 0.8 + waited * 0.2))
  redis.call('HINCRBY', ST, 'accepted', 1)
end
put(rec)
a.offers[hid] = nil
a.active[hid] = 1
a.last = now
put_agent(a)
if first then outbox(8) end
notify()
return {'ok', cjson.encode(rec), first and '1' or '0'}
"""
)

# ARGV: 3 hid, 4 agent id
DESK_DECLINE = (
    _DESK_PRELUDE
    + """
local hid, id = ARGV[3], ARGV[4]
local rec = get(hid)
if not rec or rec.state ~= 'offered' or rec.offered_to ~= id then return {'not_offered'} end
local a = agent(id)
if a then a.offers[hid] = nil; put_agent(a) end
rec.declined = rec.declined or {}
rec.declined[id] = 1
rec.state = 'queued'
rec.offered_to = nil
rec.offer_until = nil
put(rec)
notify()
return {'ok'}
"""
)

# A conversation with no open handoff, taken over by an agent.
# ARGV: 3 hid, 4 session, 5 record JSON, 6 agent id, 7 agent name, 8.. outbox
DESK_PICK = (
    _DESK_PRELUDE
    + """
local hid, session, id, name = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local existing = redis.call('HGET', S, session)
if existing then return {'exists', existing} end
local a = agent(id)
if not a then return {'no_agent'} end
local rec = cjson.decode(ARGV[5])
rec.id = hid
rec.session = session
rec.state = 'active'
rec.requested = now
rec.joined = now
rec.agent = id
rec.agent_name = name
put(rec)
redis.call('HSET', S, session, hid)
a.active[hid] = 1
a.last = now
put_agent(a)
outbox(8)
notify()
return {'ok', cjson.encode(rec)}
"""
)

# ARGV: 3 hid, 4 agent id ('' for the customer leaving the queue: only while no agent
# has joined), 5 outcome, 6 disposition, 7.. outbox
DESK_RELEASE = (
    _DESK_PRELUDE
    + """
local hid, id = ARGV[3], ARGV[4]
local rec = get(hid)
if not rec then return {'missing'} end
if id == '' then
  if rec.state ~= 'queued' and rec.state ~= 'offered' then return {'joined'} end
elseif rec.agent ~= id or (rec.state ~= 'active' and rec.state ~= 'grace') then
  return {'not_owner'}
end
redis.call('HDEL', H, hid)
if redis.call('HGET', S, rec.session) == hid then redis.call('HDEL', S, rec.session) end
redis.call('ZREM', qkey(rec.queue), hid)
for _, aid in ipairs({rec.agent, rec.offered_to}) do
  local a = agent(aid)
  if a then a.active[hid] = nil; a.offers[hid] = nil; put_agent(a) end
end
rec.state = 'ended'
rec.ended = now
rec.outcome = ARGV[5]
rec.disposition = ARGV[6]
outbox(7)
notify()
return {'ok', cjson.encode(rec)}
"""
)

# ARGV: 3 agent id, 4 agent JSON (name, skills, max, status), 5 connection id.
# Returns (handoff id, state before) of the agent's conversations: `grace` ones come back.
DESK_AGENT_JOIN = (
    _DESK_PRELUDE
    + """
local id = ARGV[3]
local spec = cjson.decode(ARGV[4])
local a = agent(id) or {id = id, active = {}, offers = {}, last = 0}
a.name, a.skills, a.max, a.status = spec.name, spec.skills, spec.max, spec.status
a.want = spec.status
a.seen = now
a.conn = ARGV[5]
local resumed = {}
for hid in pairs(a.active) do
  local rec = get(hid)
  if rec == nil or rec.agent ~= id then
    a.active[hid] = nil
  else
    local was = rec.state
    if rec.state == 'grace' then
      rec.state = 'active'
      rec.grace_until = nil
      rec.agent_name = a.name
      put(rec)
    end
    resumed[#resumed + 1] = hid
    resumed[#resumed + 1] = was
  end
end
for hid in pairs(a.offers) do
  local rec = get(hid)
  if rec == nil or rec.state ~= 'offered' or rec.offered_to ~= id then a.offers[hid] = nil end
end
put_agent(a)
notify()
return resumed
"""
)

# Availability, skills, or just "still here". ARGV: 3 agent id, 4 connection id,
# 5 status ('' keeps), 6 skills JSON ('' keeps). Returns 0 for a stale connection,
# else {1, records taken back from a grace period...}.
DESK_AGENT_UPDATE = (
    _DESK_PRELUDE
    + """
local a = agent(ARGV[3])
if not a or a.conn ~= ARGV[4] then return 0 end
local changed = false
local restored = {1}
if ARGV[5] ~= '' then a.want = ARGV[5] end
if ARGV[6] ~= '' then a.skills = cjson.decode(ARGV[6]); changed = true end
if a.status ~= a.want then
  -- a new availability, or back from being taken for gone (a slow instance)
  if a.status == 'offline' then
    for hid in pairs(a.active) do
      local rec = get(hid)
      if rec and rec.agent == a.id and rec.state == 'grace' then
        rec.state = 'active'
        rec.grace_until = nil
        put(rec)
        restored[#restored + 1] = cjson.encode(rec)
      end
    end
  end
  a.status = a.want
  changed = true
end
a.seen = now
put_agent(a)
if changed then notify() end
return restored
"""
)

# The agent's stream ended. ARGV: 3 agent id, 4 connection id, 5 grace ms.
# Returns the records now in their grace period.
DESK_AGENT_LEAVE = (
    _DESK_PRELUDE
    + """
local a = agent(ARGV[3])
if not a or a.conn ~= ARGV[4] then return {} end
a.status = 'offline'
-- This connection is over: a late heartbeat or availability frame of it (one
-- already on its way when the stream ended) is refused as stale instead of
-- taking the conversations back out of their grace period.
a.conn = ''
local out = {}
for hid in pairs(a.offers) do
  local rec = get(hid)
  if rec and rec.state == 'offered' and rec.offered_to == a.id then
    rec.state = 'queued'
    rec.offered_to = nil
    rec.offer_until = nil
    put(rec)
  end
end
a.offers = {}
for hid in pairs(a.active) do
  local rec = get(hid)
  if rec and rec.agent == a.id and rec.state == 'active' then
    rec.state = 'grace'
    rec.grace_until = now + tonumber(ARGV[5])
    put(rec)
    out[#out + 1] = cjson.encode(rec)
  end
end
put_agent(a)
notify()
return out
"""
)
