"""The Lua scripts behind the worker's atomic steps, one script call per batch.

Redis runs a script as one step, so each script below is the protocol's "one script
or transaction" for every message in it. Per message they use ``redis.pcall``: a key
holding the wrong type (a poison entry, say ``SET P:{sid}:reply x``) fails that
message alone, reported in its status, never the batch. An error by which Redis
refuses writes *for now* (out of memory, a read-only replica) aborts the whole call
(the caller retries it like an outage); what ran before the abort is
safe to run again (a claim finds its own record, a written reply finds ``|done``).

Every script names every key in KEYS. On one Redis server a FINISH or CLAIM batch
spans slots; on a Redis Cluster the batch is split by slot (CLAIM per slot group,
SLOT_FINISH per slot group with dead letters and XACKs around it: see
:mod:`worker.cluster`).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

CLAIM: Final = """
-- KEYS[2i-1]: P:{sid}:seen:<mid>, KEYS[2i]: P:{sid}:session; ARGV[3i-2]:
-- "<shard>|<entry id>", ARGV[3i-1]: ttl (ms), ARGV[3i]: the SHA-1 (hex) the session
-- record must have, or "" (a handshake: its session is created later).
-- Per request: false when this call set the record, else its previous value, "!"
-- when the key holds another type, or "?" when the session record is not the one
-- named (changed, revoked, expired: nothing is set). A redelivery (the record is
-- this entry's) pushes the expiry out, never in.
-- An error by which Redis says it cannot write *for now* (out of memory, a replica)
-- aborts the call: the caller waits it out and retries.
local FOR_NOW = {OOM = true, LOADING = true, READONLY = true, MASTERDOWN = true,
  TRYAGAIN = true, CLUSTERDOWN = true, BUSY = true}
local out, digests = {}, {}
for i = 1, #KEYS / 2 do
  local seen, session = KEYS[2 * i - 1], KEYS[2 * i]
  local owner, ttl, digest = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local live = true
  if digest ~= '' then
    local have = digests[session]
    if have == nil then
      local record = redis.pcall('GET', session)
      have = type(record) == 'string' and redis.sha1hex(record) or ''
      digests[session] = have
    end
    live = have == digest
  end
  if not live then
    out[i] = '?'
  else
    local prev = redis.pcall('SET', seen, owner, 'NX', 'PX', ttl, 'GET')
    if type(prev) == 'table' and prev.err then
      if FOR_NOW[string.match(prev.err, '^%u+')] then return redis.error_reply(prev.err) end
      out[i] = '!'
    else
      if prev == owner then redis.pcall('PEXPIRE', seen, ttl, 'GT') end
      out[i] = prev
    end
  end
end
return out
"""

#: Lua shared by FINISH and SLOT_FINISH (it needs ``maxlen`` and ``fallback`` set first):
#: the protocol's reply step for one message, and a notice.
_REPLY_STEP: Final = """
local maxlen, fallback = ARGV[1], tonumber(ARGV[2])
local FOR_NOW = {OOM = true, LOADING = true, READONLY = true, MASTERDOWN = true,
  TRYAGAIN = true, CLUSTERDOWN = true, BUSY = true}
local function failed(r)
  if type(r) == 'table' and r.err then
    -- Cannot write *for now*: abort the call (the caller waits and retries it).
    if FOR_NOW[string.match(r.err, '^%u+')] then error(r) end
    return true
  end
  return false
end
local expired = {}
local function expire_with_session(reply, session)
  -- Once per reply stream and call: a batch often holds many replies of one session.
  if expired[reply] then return end
  expired[reply] = true
  local pt = redis.call('PTTL', session)
  if pt > 0 then redis.pcall('PEXPIRE', reply, pt)
  elseif redis.call('PTTL', reply) < fallback then redis.pcall('PEXPIRE', reply, fallback) end
end
-- 1 written, 0 the record is not this entry's, -1 the session exists, -2 unanswerable.
local function reply_step(seen, reply, session, owner, field, payload, ttl, record, expiry)
  local cur = redis.pcall('GET', seen)
  if failed(cur) then return -2 end
  if cur and cur ~= owner then return 0 end
  if not cur then
    -- The record expired while the handler ran: no other entry holds the mid
    -- (a copy would hold it, or be stale by now), so it is this entry's again.
    redis.pcall('SET', seen, owner, 'PX', ttl)
  end
  if record ~= '' then
    local made = redis.pcall('SET', session, record, 'NX', 'PXAT', expiry)
    if failed(made) then return -2 elseif not made then return -1 end
  end
  if failed(redis.pcall('XADD', reply, 'MAXLEN', '~', maxlen, '*', field, payload)) then
    return -2
  end
  expire_with_session(reply, session)
  redis.pcall('SET', seen, owner .. '|done', 'KEEPTTL')
  return 1
end
local function notify(reply, session, field, payload)
  if failed(redis.pcall('XADD', reply, 'MAXLEN', '~', maxlen, '*', field, payload)) then
    return false
  end
  expire_with_session(reply, session)
  return true
end
"""

FINISH: Final = (
    _REPLY_STEP
    + """
-- ARGV[1..4]: reply maxlen, reply-stream ttl without a session (ms), dlq maxlen, group.
-- Then one item per message, its keys taken from KEYS in order:
--   R (reply)   keys seen, reply, session, stream[, dlq]
--               args entry id, owner, field, payload, seen ttl, record, record expiry,
--               n, then n dead-letter field/value pairs (written first)
--   N (refusal) keys [reply, session,] dlq, stream
--               args entry id, notice?, [field, payload,] n, n field/value pairs
--   A (ack)     keys stream; args entry id
-- Status per item. R: 1 written, 0 the record is not this entry's (done or taken),
-- -1 the session already exists (handshake), -2 unanswerable (the reply could not be
-- added), -3 its dead letter could not be added (nothing written: left pending, so a
-- redelivery writes both; the delivery limit ends the attempts). N: 1, plus 2 if the
-- notice failed, plus 4 if the dead letter failed.
-- Acknowledged: every item but R's -1, -2 (which the caller refuses instead) and -3.
local dlqlen, group = ARGV[3], ARGV[4]
local k, a = 1, 5
local acks, out = {}, {}
local function key() k = k + 1; return KEYS[k - 1] end
local function arg() a = a + 1; return ARGV[a - 1] end
local function ack(stream, id)
  local ids = acks[stream]
  if not ids then ids = {}; acks[stream] = ids end
  ids[#ids + 1] = id
end
local function letter(dlq, n)
  local cmd = {'XADD', dlq, 'MAXLEN', '~', dlqlen, '*'}
  for _ = 1, 2 * n do cmd[#cmd + 1] = arg() end
  return not failed(redis.pcall(unpack(cmd)))
end
local i = 0
while a <= #ARGV do
  i = i + 1
  local kind = arg()
  if kind == 'R' then
    local seen, reply, session, stream = key(), key(), key(), key()
    local id, owner, field, payload, ttl = arg(), arg(), arg(), arg(), arg()
    local record, expiry, n = arg(), arg(), tonumber(arg())
    local status = nil
    if n > 0 then
      local dlq, cur = key(), redis.pcall('GET', seen)
      if not failed(cur) and (not cur or cur == owner) then
        -- The dead letter only while the request is still this entry's to answer (a
        -- retried call must not write it twice). If it cannot be added, nothing is:
        -- the redelivery writes both (the delivery limit ends the attempts).
        if not letter(dlq, n) then status = -3 end
      else
        a = a + 2 * n
      end
    end
    if status == nil then
      status = reply_step(seen, reply, session, owner, field, payload, ttl, record, expiry)
    end
    if status >= 0 then ack(stream, id) end
    out[i] = status
  elseif kind == 'N' then
    local id, notice = arg(), arg()
    local status = 1
    if notice == '1' then
      local reply, session = key(), key()
      local field, payload = arg(), arg()
      if not notify(reply, session, field, payload) then status = status + 2 end
    end
    local dlq, stream = key(), key()
    if not letter(dlq, tonumber(arg())) then status = status + 4 end
    ack(stream, id)
    out[i] = status
  else
    local stream = key()
    ack(stream, arg())
    out[i] = 1
  end
end
for stream, ids in pairs(acks) do redis.pcall('XACK', stream, group, unpack(ids)) end
return out
"""
)

SLOT_FINISH: Final = (
    _REPLY_STEP
    + """
-- One slot's share of a FINISH on a Redis Cluster: the batch is split by the slot of
-- each message's {sid}; its dead letters are added before this call and its XACKs
-- after it, as commands of their own (they live in other slots).
-- ARGV[1..2]: reply maxlen, reply-stream ttl without a session (ms). Then per item:
--   R keys seen, reply, session; args owner, field, payload, seen ttl, record, expiry
--   N keys reply, session; args field, payload
-- Status per item. R: as FINISH's (1, 0, -1, -2). N: 1, or 3 if the notice failed.
local k, a = 1, 3
local out = {}
local function key() k = k + 1; return KEYS[k - 1] end
local function arg() a = a + 1; return ARGV[a - 1] end
local i = 0
while a <= #ARGV do
  i = i + 1
  if arg() == 'R' then
    local seen, reply, session = key(), key(), key()
    local owner, field, payload, ttl = arg(), arg(), arg(), arg()
    local record, expiry = arg(), arg()
    out[i] = reply_step(seen, reply, session, owner, field, payload, ttl, record, expiry)
  else
    local reply, session = key(), key()
    local field, payload = arg(), arg()
    out[i] = notify(reply, session, field, payload) and 1 or 3
  end
end
return out
"""
)


@functools.cache
def sha1(script: str) -> str:
    """The name Redis gives a script (EVALSHA); computed once per script."""
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis names scripts so
