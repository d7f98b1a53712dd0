"""The Lua script that appends behaviours to one user atomically (docs/feature-store.md).

KEYS  1 the user's value `v{V}:u:{uid}`   2 the user's event-id ring `v{V}:e:{uid}`
      3 the user's pending list `v{V}:p:{uid}`   4 the fence of the user's slot `v{V}:f:{tag}`
      5 the set of users with pending events in that slot `v{V}:q:{tag}`
ARGV  1 mode: "append" (events follow) or "merge" (events come from the pending list)
      2 n, the number of events; 3 their records, 24 bytes each (records.RECORD_DTYPE),
      in arrival order; 4 .. 3+n their event ids (bytes, 1..128); 4+n the TTL of parked
      events; 5+n the user id (text)
Reply {status, next version or "-", applied, duplicates}; status is
      "ok" | "repaired" (the old value was corrupt, or a key of another type, and was
      replaced) | "pending" (parked: the version is loading) | "retired" (go to `next`) |
      "stale" (no such version).

A user's key of the wrong type (a stray RPUSH on the value, a SET on the id ring or the
pending list) is garbage like a corrupt value: replaced, never a WRONGTYPE error that
would fail the whole batch, batch after batch, with the other users' events stored.

The event-id ring keeps the user's latest `id_window` ids, or all of the latest call's
when it brought more (so the same call, retried, appends nothing).
Everything a version decides (max history, profile count, TTLs, the dedup window) is
read from the fence, so the script needs no other key. Ids and timestamps stay opaque
8-byte strings except for the comparison of timestamps, done on exact 32-bit halves
(Lua numbers are doubles: an int64 does not fit). Events are inserted one by one in
arrival order before the first stored record that is not newer, so equal timestamps
keep "later arrival = newer", the bulk loader's rule for equal timestamps.
"""

from __future__ import annotations

import hashlib

PENDING_TTL_S = 7 * 86_400  # parked events of a load that is never resumed expire

APPEND_LUA = r"""
local fence = redis.call('GET', KEYS[4])
if not fence then return {'stale', '-', 0, 0} end
local f = {}
for tok in string.gmatch(fence, '%S+') do f[#f + 1] = tok end
local state, nxt = f[1], f[2]
local max_history, n_profile, user_ttl = tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
local id_window, id_ttl = tonumber(f[6]), tonumber(f[7])
if state == 'R' then return {'retired', nxt, 0, 0} end

-- a key of another type than the script writes holds garbage (a stray write): drop it
local function own(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
end

local recs, ids = {}, {}
if ARGV[1] == 'append' then
  local n = tonumber(ARGV[2])
  local blob = ARGV[3]
  for i = 1, n do
    recs[i] = string.sub(blob, 24 * i - 23, 24 * i)
    ids[i] = ARGV[3 + i]
  end
  if state == 'L' then
    own(KEYS[3], 'list')
    own(KEYS[5], 'set')
    local items = {}
    for i = 1, n do items[i] = recs[i] .. ids[i] end
    for a = 1, n, 1000 do
      redis.call('RPUSH', KEYS[3], unpack(items, a, math.min(a + 999, n)))
    end
    redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4 + n]))
    redis.call('SADD', KEYS[5], ARGV[5 + n])
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[4 + n]))
    return {'pending', nxt, n, 0}
  end
else
  if state == 'L' then return redis.error_reply('ERR merge of pending events before the version is sealed') end
  own(KEYS[3], 'list')
  local items = redis.call('LRANGE', KEYS[3], 0, -1)
  for i, item in ipairs(items) do
    recs[i] = string.sub(item, 1, 24)
    ids[i] = string.sub(item, 25)
  end
  redis.call('DEL', KEYS[3])
  if #items == 0 then return {'ok', nxt, 0, 0} end
end

-- the stored history, newest first
local status = 'ok'
local head = nil
local hist, his, los = {}, {}, {}
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' and value.err then  -- WRONGTYPE: not a string at all; SET below replaces it
  status = 'repaired'
  value = false
end
if value then
  local len = string.len(value)
  local p = 0
  if len >= 8 then p = string.byte(value, 6) end
  local hl = 8 + 8 * p
  if len < hl or string.sub(value, 1, 4) ~= 'DINU' or string.byte(value, 5) ~= 1 or (len - hl) % 24 ~= 0 then
    status = 'repaired'
  else
    head = string.sub(value, 1, hl)
    for j = 1, (len - hl) / 24 do
      local r = string.sub(value, hl + 24 * j - 23, hl + 24 * j)
      hist[j] = r
      los[j], his[j] = struct.unpack('<I4i4', r, 17)
    end
  end
end
if not head then
  head = 'DINU' .. string.char(1, n_profile, 0, 0) .. string.rep('\255', 8 * n_profile)
end

-- insert each new event before the first stored record that is not newer
own(KEYS[2], 'list')
local seen, fresh = {}, {}
local applied, dups = 0, 0
for i = 1, #recs do
  local id = ids[i]
  if seen[id] or redis.call('LPOS', KEYS[2], id) then
    dups = dups + 1
  else
    seen[id] = true
    fresh[#fresh + 1] = id
    applied = applied + 1
    local lo, hi = struct.unpack('<I4i4', recs[i], 17)
    local pos = #hist + 1
    for j = 1, #hist do
      if his[j] < hi or (his[j] == hi and los[j] <= lo) then pos = j break end
    end
    if pos <= max_history then
      table.insert(hist, pos, recs[i])
      table.insert(his, pos, hi)
      table.insert(los, pos, lo)
      if #hist > max_history then
        table.remove(hist); table.remove(his); table.remove(los)
      end
    end
  end
end

if applied > 0 or status == 'repaired' or not value then
  local body = head .. table.concat(hist, '', 1, math.min(#hist, max_history))
  if user_ttl > 0 then
    redis.call('SET', KEYS[1], body, 'EX', user_ttl)
  else
    redis.call('SET', KEYS[1], body)
  end
elseif user_ttl > 0 then
  redis.call('EXPIRE', KEYS[1], user_ttl)
end
if #fresh > 0 then
  for a = 1, #fresh, 1000 do
    redis.call('LPUSH', KEYS[2], unpack(fresh, a, math.min(a + 999, #fresh)))
  end
  -- keep every id of this call even past the window: a retry of this very batch is then
  -- all duplicates, however many of its events are this user's
  redis.call('LTRIM', KEYS[2], 0, math.max(id_window, #fresh) - 1)
end
if id_ttl > 0 and (#fresh > 0 or dups > 0) then redis.call('EXPIRE', KEYS[2], id_ttl) end
return {status, nxt, applied, dups}
"""

APPEND_SHA = hashlib.sha1(APPEND_LUA.encode()).hexdigest()
