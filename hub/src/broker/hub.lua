#!lua name=hub
-- The hub's Redis functions, version __VERSION__, with the __PLACEHOLDERS__ filled from the
-- configuration of the node that loaded it. A node loads it when none is loaded or the loaded
-- one is older (`hub_version`); it never replaces a newer one, and with the same version the
-- settings of the node that loaded it apply to all (a node with other settings logs that).
--
--   FCALL_RO hub_version 0                          -> {version, maxlen, ttl_ms, max_bytes, idem_ms, namespaces hash (version 6), webhook max pending (7)}
--   FCALL hub_publish 1 <channel> <envelope> [<key>] -> the message id ("<ms>-<seq>")
--     with an idempotency key (1-128 printable ASCII) already used on the channel within
--     IDEM_MS: the first call's id, and nothing is published (hub:idem:{<channel>}:<key>).
--   FCALL_RO hub_read 1 <channel> <after or ""> <count>
--                                                   -> {tail, floor, id1, env1, id2, env2, ...}
--     at most <count> messages after <after> (none with "" or 0); every message after floor is
--     still in history, so a reader before floor (or after tail) lost some.
--   FCALL_RO hub_rewind 1 <channel> <n>             -> the position before the last <n> messages
--     (history's floor when it holds fewer): a reader resuming from there gets exactly them.
--   FCALL_RO hub_recover 1 <channel> <since or "">  -> {tail, reset (0|1), id1, env1, ...}
--     (unbounded; kept for nodes of the previous version during a rolling deploy)
--
-- Presence (version 5):
--   FCALL hub_presence 1 <channel> <node> <anonymous streams or -> [<sub> <streams>]...
--     sets this node's stream counts on the channel (absolute, so a retry is harmless), keeps
--     the totals over all nodes, and publishes {"type":"join"|"leave","sub":...} on
--     hub:pres:<channel> when a user's total leaves or reaches 0. Returns the events sent.
--   FCALL hub_presence_drop 1 <channel> <node>      -> events: removes a node's counts
--   FCALL_RO hub_presence_read 1 <channel>          -> {"", anonymous, "=sub", streams, ...}
--   FCALL hub_presence_lease 1 hub:presence:nodes <node> <lease ms> -> nodes whose lease ran out
--     (the node's own lease renewed first; leases are scored by Redis's clock)
--   Version 7: both also append webhook events (see below) when the channel's namespace has
--   webhooks and the stream hub:{webhooks} exists (a node with HUB_WEBHOOK_URL creates it).
-- Counts: hub:presence:{<channel>} (field "<node>\0" anonymous, "<node>\0=<sub>" a user), totals:
-- hub:present:{<channel>} (field "" anonymous, "=<sub>" a user); a node's channels:
-- hub:presence:chans:{<node>} (a set, kept by the node).
--
-- Webhooks (version 7): hub:{webhooks} is a stream of {t = type, c = channel, s = sub} entries
-- (its id is the event's id and time), appended by the presence functions when a channel's
-- total crosses 0 (channel_occupied / channel_vacated) or a user's does (member_added /
-- member_removed), at most WH_MAX long (the oldest beyond are trimmed, counted in
-- hub:{webhooks}:dropped). Nodes read it through the consumer group "hub"; one node at a time
-- (the holder of hub:{webhooks}:lock) sends, so events go out in order:
--   FCALL hub_webhook_take 3 hub:{webhooks}:lock hub:{webhooks} hub:{webhooks}:dropped <node> <lock ms> <count>
--     -> {held (0|1), dropped since the last call, entries waiting (-1: no stream), id1, type1,
--         channel1, sub1 or "", ...}
--     takes or renews the lock; a node that just took it first claims every unacknowledged
--     entry (of a node that died while sending); its own unacknowledged entries come first.
--   FCALL hub_webhook_ack 1 hub:{webhooks} <id>...   -> acknowledges and deletes the entries
-- In Redis Cluster the stream is not reachable from the presence functions (another slot):
-- webhooks need a standalone or Sentinel Redis.
-- History of a channel is the stream hub:hist:{<channel>}; hub:floor:{<channel>} holds the id of
-- the newest message that history no longer has (trimmed, expired, or from before the stream
-- was created), so a resume from before it is a reset. Live messages go to hub:ch:<channel>
-- (hub:ch:{<channel>} with SPUBLISH in cluster mode); all of them share the channel's hash slot.
-- A durable message is published as "<id> <envelope>" on hub:dur:<channel> (hub:dur:{<channel>}
-- in cluster mode), where nothing but this function publishes, so no ephemeral publish can pass
-- for it; the same form also goes to the live channel for nodes of version 1, which read it
-- there (later nodes ignore it there). An ephemeral message is the envelope alone, on the live
-- channel.
-- (Redis does not move a stream's max-deleted-entry-id when it trims, hence the floor key.)

local VERSION = __VERSION__
local MAXLEN = __MAXLEN__
local TTL_MS = __TTL_MS__
local MAX_BYTES = __MAX_BYTES__
local IDEM_MS = __IDEM_MS__
local CLUSTER = __CLUSTER__
-- Namespaces (longest prefix first, the default "" last): {prefix, history length, TTL in ms,
-- webhooks}; a channel in none of them keeps MAXLEN, TTL_MS and sends webhooks. NS_HASH tells
-- nodes whether they run the same namespaces.
local NAMESPACES = __NAMESPACES__
local NS_HASH = __NS_HASH__
local WH_MAX = __WH_MAX__
local WH_STREAM, WH_DROPPED, WH_GROUP = 'hub:{webhooks}', 'hub:{webhooks}:dropped', 'hub'

-- A channel's history length and TTL (ms): its namespace's (the longest prefix), else the
-- defaults.
local function limits(ch)
  for i = 1, #NAMESPACES do
    local ns = NAMESPACES[i]
    if string.sub(ch, 1, #ns[1]) == ns[1] then return ns[2], ns[3] end
  end
  return MAXLEN, TTL_MS
end

-- Whether a channel's namespace sends webhooks.
local function webhooks_on(ch)
  for i = 1, #NAMESPACES do
    local ns = NAMESPACES[i]
    if string.sub(ch, 1, #ns[1]) == ns[1] then return ns[4] end
  end
  return true
end

local function history_key(ch)
  return 'hub:hist:{' .. ch .. '}'
end

local function floor_key(ch)
  return 'hub:floor:{' .. ch .. '}'
end

local function live_channel(ch)
  if CLUSTER then return 'hub:ch:{' .. ch .. '}' end
  return 'hub:ch:' .. ch
end

local function durable_channel(ch)
  if CLUSTER then return 'hub:dur:{' .. ch .. '}' end
  return 'hub:dur:' .. ch
end

local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if not ms then return nil end
  return tonumber(ms), tonumber(seq)
end

local function before(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

local function valid_channel(ch)
  return #ch >= 1 and #ch <= 128 and string.match(ch, '^[A-Za-z0-9][A-Za-z0-9_.:@/%-]*$') ~= nil
end

local function valid_event(ev)
  return ev == nil or (type(ev) == 'string' and #ev >= 1 and #ev <= 128
    and not string.find(ev, '%c') and string.sub(ev, 1, 4) ~= 'hub.')
end

-- Redis's clock in milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The id of the last entry ever added to an existing stream (trimmed or not).
local function last_generated(key)
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return '0-0'
end

local function publish(keys, args)
  local ch, env, idem = keys[1], args[1], args[2]
  if ch == nil or env == nil then
    return redis.error_reply('ERR usage: FCALL hub_publish 1 <channel> <envelope> [<idempotency key>]')
  end
  if not valid_channel(ch) then
    return redis.error_reply('ERR invalid channel name (^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$)')
  end
  if #env > MAX_BYTES then
    return redis.error_reply('ERR envelope is larger than HUB_MAX_MESSAGE_BYTES (' .. MAX_BYTES .. ')')
  end
  local ok, decoded = pcall(cjson.decode, env)
  if not ok or type(decoded) ~= 'table' or decoded['data'] == nil then
    return redis.error_reply('ERR envelope must be a JSON object {"event": "...", "data": ...}')
  end
  if not valid_event(decoded['event']) then
    return redis.error_reply('ERR event must be 1 to 128 characters, no control characters, not hub.*')
  end
  local ikey = nil
  if idem ~= nil then
    if #idem < 1 or #idem > 128 or string.find(idem, '[^ -~]') then
      return redis.error_reply('ERR an idempotency key is 1 to 128 printable ASCII characters')
    end
    ikey = 'hub:idem:{' .. ch .. '}:' .. idem
    local first = redis.call('GET', ikey)
    if first then return first end
  end
  local maxlen, ttl = limits(ch)
  local key, fkey = history_key(ch), floor_key(ch)
  local len = redis.call('XLEN', key)
  local fresh = len == 0 and redis.call('EXISTS', key) == 0
  local floor = nil
  if maxlen > 0 and len >= maxlen then
    -- The oldest entries are about to be trimmed; the newest of them becomes the floor.
    local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', len - maxlen + 1)
    floor = gone[#gone][1]
  end
  local id = redis.call('XADD', key, 'MAXLEN', '=', maxlen, '*', 'e', env)
  local ms = parse_id(id)
  local horizon = ms - ttl
  if maxlen == 0 then floor = id end
  if fresh then
    -- A new stream vouches only for what follows now-TTL: an older position may have missed
    -- messages of a stream that expired.
    floor = horizon .. '-0'
  else
    local expired = redis.call('XREVRANGE', key, '(' .. horizon .. '-0', '-', 'COUNT', 1)
    if #expired > 0 then
      floor = expired[1][1]
      redis.call('XTRIM', key, 'MINID', horizon)
    end
  end
  if floor then redis.call('SET', fkey, floor) end
  redis.call('PEXPIRE', fkey, ttl)
  redis.call('PEXPIRE', key, ttl)
  local pub = 'PUBLISH'
  if CLUSTER then pub = 'SPUBLISH' end
  local note = id .. ' ' .. env
  redis.call(pub, durable_channel(ch), note)
  redis.call(pub, live_channel(ch), note)
  if ikey then redis.call('SET', ikey, id, 'PX', IDEM_MS) end
  return id
end

local function recover(keys, args)
  local ch, since = keys[1], args[1] or ''
  local key = history_key(ch)
  local now = now_ms()
  local _, ttl = limits(ch)
  local horizon = now - ttl
  local s_ms, s_seq
  if since ~= '' then
    s_ms, s_seq = parse_id(since)
    if not s_ms then return {'0-0', 1} end
  end
  if redis.call('EXISTS', key) == 0 then
    -- Nothing was published for a TTL (or ever): a position within the TTL missed nothing.
    -- A fresh stream starts just before now, so the first message (at now or later) follows it.
    local tail = (now - 1) .. '-0'
    if since == '' then return {tail, 0} end
    if s_ms < horizon or s_ms > now then return {tail, 1} end
    return {since, 0}
  end
  local last = last_generated(key)
  if since == '' then return {last, 0} end
  local l_ms, l_seq = parse_id(last)
  local f_ms, f_seq = parse_id(redis.call('GET', floor_key(ch)) or '0-0')
  if before(l_ms, l_seq, s_ms, s_seq) or before(s_ms, s_seq, f_ms, f_seq) then
    return {last, 1}
  end
  local entries = redis.call('XRANGE', key, '(' .. since, '+')
  if #entries > 0 and parse_id(entries[1][1]) < horizon then
    -- Older than the TTL: expired even if not trimmed yet.
    return {last, 1}
  end
  local out = {last, 0}
  for _, e in ipairs(entries) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][2]
  end
  return out
end

-- The newest position history no longer vouches for: the floor key, or the newest entry older
-- than the TTL (lost even where not trimmed yet) when that is later.
local function floor_of(ch, key, horizon)
  local floor = redis.call('GET', floor_key(ch)) or '0-0'
  local f_ms, f_seq = parse_id(floor)
  local expired = redis.call('XREVRANGE', key, '(' .. horizon .. '-0', '-', 'COUNT', 1)
  if #expired > 0 then
    local e_ms, e_seq = parse_id(expired[1][1])
    if before(f_ms, f_seq, e_ms, e_seq) then return expired[1][1], e_ms, e_seq end
  end
  return floor, f_ms, f_seq
end

local function read(keys, args)
  local ch, after, count = keys[1], args[1] or '', tonumber(args[2] or '0') or 0
  local key = history_key(ch)
  local now = now_ms()
  local _, ttl = limits(ch)
  local horizon = now - ttl
  if redis.call('EXISTS', key) == 0 then
    -- Nothing was published for a TTL (or ever): positions within the TTL missed nothing. A
    -- fresh reader starts just before now, so the first message (at now or later) follows it.
    return {(now - 1) .. '-0', horizon .. '-0'}
  end
  local last = last_generated(key)
  local floor, f_ms, f_seq = floor_of(ch, key, horizon)
  local out = {last, floor}
  if after == '' or count <= 0 then return out end
  local a_ms, a_seq = parse_id(after)
  if not a_ms then return redis.error_reply('ERR after must be <ms>-<seq>') end
  -- Only what history still holds for certain: after the later of `after` and the floor.
  local from = after
  if before(a_ms, a_seq, f_ms, f_seq) then from = floor end
  local entries = redis.call('XRANGE', key, '(' .. from, '+', 'COUNT', count)
  for _, e in ipairs(entries) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][2]
  end
  return out
end

local function rewind(keys, args)
  local ch, n = keys[1], tonumber(args[1] or '0') or 0
  local key = history_key(ch)
  local now = now_ms()
  if redis.call('EXISTS', key) == 0 then
    -- Nothing to replay: the tail a fresh reader gets (see read).
    return (now - 1) .. '-0'
  end
  if n <= 0 then return last_generated(key) end
  local maxlen, ttl = limits(ch)
  if maxlen > 0 and n > maxlen then n = maxlen end
  local floor, f_ms, f_seq = floor_of(ch, key, now - ttl)
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', n + 1)
  if #newest > n then
    local p = newest[n + 1][1]
    local p_ms, p_seq = parse_id(p)
    if not before(p_ms, p_seq, f_ms, f_seq) then return p end
  end
  return floor
end

local function presence_channel(ch)
  if CLUSTER then return 'hub:pres:{' .. ch .. '}' end
  return 'hub:pres:' .. ch
end

-- Adds `delta` to a total; sends join/leave when a user's total crosses 0, and notes the
-- member event in `events` (when given). Returns 1 if sent.
local function add_total(ch, tkey, field, delta, events)
  if delta == 0 then return 0 end
  local total = redis.call('HINCRBY', tkey, field, delta)
  if total <= 0 then redis.call('HDEL', tkey, field) end
  if field == '' then return 0 end
  local before_total = total - delta
  local kind = nil
  if before_total <= 0 and total > 0 then kind = 'join' end
  if before_total > 0 and total <= 0 then kind = 'leave' end
  if not kind then return 0 end
  local pub = 'PUBLISH'
  if CLUSTER then pub = 'SPUBLISH' end
  local sub = string.sub(field, 2)
  redis.call(pub, presence_channel(ch), cjson.encode({type = kind, sub = sub}))
  if events then
    local t = 'member_added'
    if kind == 'leave' then t = 'member_removed' end
    events[#events + 1] = {t, sub}
  end
  return 1
end

-- Whether webhook events of `ch` are recorded: its namespace sends them and a node with
-- HUB_WEBHOOK_URL created the stream (never in a cluster: the stream is in another slot).
local function webhooks_wanted(ch)
  return not CLUSTER and webhooks_on(ch) and redis.call('EXISTS', WH_STREAM) == 1
end

-- Appends a channel's webhook events: occupied first, then the member events, then vacated
-- (`was`/`is`: whether the channel had any stream over all nodes before and after).
local function append_webhooks(ch, was, is, events)
  local all = {}
  if not was and is then all[1] = {'channel_occupied'} end
  for _, e in ipairs(events) do all[#all + 1] = e end
  if was and not is then all[#all + 1] = {'channel_vacated'} end
  for _, e in ipairs(all) do
    if redis.call('XLEN', WH_STREAM) >= WH_MAX then redis.call('INCR', WH_DROPPED) end
    if e[2] then
      redis.call('XADD', WH_STREAM, 'MAXLEN', '=', WH_MAX, '*', 't', e[1], 'c', ch, 's', e[2])
    else
      redis.call('XADD', WH_STREAM, 'MAXLEN', '=', WH_MAX, '*', 't', e[1], 'c', ch)
    end
  end
end

local function presence(keys, args)
  local ch, node, anon = keys[1], args[1], args[2]
  if ch == nil or node == nil or anon == nil or #args % 2 ~= 0 then
    return redis.error_reply('ERR usage: FCALL hub_presence 1 <channel> <node> <anonymous or -> [<sub> <streams>]...')
  end
  local hkey, tkey = 'hub:presence:{' .. ch .. '}', 'hub:present:{' .. ch .. '}'
  local function set(field, count)
    local old = tonumber(redis.call('HGET', hkey, field) or '0')
    if count > 0 then redis.call('HSET', hkey, field, count) else redis.call('HDEL', hkey, field) end
    return count - old
  end
  local events, was = nil, false
  if webhooks_wanted(ch) then
    events = {}
    was = redis.call('EXISTS', tkey) == 1
  end
  local sent = 0
  if anon ~= '-' then
    add_total(ch, tkey, '', set(node .. '\0', tonumber(anon) or 0), events)
  end
  for i = 3, #args, 2 do
    local sub, count = args[i], tonumber(args[i + 1]) or 0
    sent = sent + add_total(ch, tkey, '=' .. sub, set(node .. '\0=' .. sub, count), events)
  end
  if events then append_webhooks(ch, was, redis.call('EXISTS', tkey) == 1, events) end
  return sent
end

local function presence_drop(keys, args)
  local ch, node = keys[1], args[1]
  local hkey, tkey = 'hub:presence:{' .. ch .. '}', 'hub:present:{' .. ch .. '}'
  local prefix = node .. '\0'
  local fields = redis.call('HGETALL', hkey)
  local events, was = nil, false
  if webhooks_wanted(ch) then
    events = {}
    was = redis.call('EXISTS', tkey) == 1
  end
  local sent = 0
  for i = 1, #fields, 2 do
    local f, count = fields[i], tonumber(fields[i + 1]) or 0
    if string.sub(f, 1, #prefix) == prefix then
      redis.call('HDEL', hkey, f)
      sent = sent + add_total(ch, tkey, string.sub(f, #prefix + 1), -count, events)
    end
  end
  if events then append_webhooks(ch, was, redis.call('EXISTS', tkey) == 1, events) end
  return sent
end

local function presence_read(keys, args)
  return redis.call('HGETALL', 'hub:present:{' .. keys[1] .. '}')
end

local function presence_lease(keys, args)
  local node, lease = args[1], tonumber(args[2]) or 0
  local now = now_ms()
  redis.call('ZADD', keys[1], now + lease, node)
  return redis.call('ZRANGEBYSCORE', keys[1], '-inf', '(' .. now)
end

-- Entries of a stream read as {id, type, channel, sub or ""}, flat; deleted ones (a pending
-- entry trimmed meanwhile) are acknowledged and left out.
local function flatten_entries(reply, out)
  if not reply then return end
  for _, e in ipairs(reply[1][2]) do
    local id, f = e[1], e[2]
    if f then
      local m = {}
      for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
      out[#out + 1] = id
      out[#out + 1] = m['t'] or ''
      out[#out + 1] = m['c'] or ''
      out[#out + 1] = m['s'] or ''
    else
      redis.call('XACK', WH_STREAM, WH_GROUP, id)
    end
  end
end

local function webhook_take(keys, args)
  local lock, node, lock_ms, count = keys[1], args[1], tonumber(args[2]) or 0, tonumber(args[3]) or 0
  if node == nil or lock_ms <= 0 then
    return redis.error_reply('ERR usage: FCALL hub_webhook_take 3 <lock> <stream> <dropped> <node> <lock ms> <count>')
  end
  local holder = redis.call('GET', lock)
  if holder and holder ~= node then return {0, 0, redis.call('XLEN', WH_STREAM)} end
  redis.call('SET', lock, node, 'PX', lock_ms)
  local dropped = tonumber(redis.call('GET', WH_DROPPED) or '0')
  if dropped > 0 then redis.call('DEL', WH_DROPPED) end
  -- No stream (a Redis that restarted empty): -1 asks the node to create it with its group.
  if redis.call('EXISTS', WH_STREAM) == 0 then return {1, dropped, -1} end
  if not holder then
    -- Just taken: what another node read and did not acknowledge (it died, or lost the lock)
    -- is this node's now, and goes first (older than anything unread).
    local cursor = '0-0'
    repeat
      local r = redis.call('XAUTOCLAIM', WH_STREAM, WH_GROUP, node, 0, cursor, 'COUNT', 1000, 'JUSTID')
      cursor = r[1]
    until cursor == '0-0'
  end
  local out = {1, dropped, redis.call('XLEN', WH_STREAM)}
  if count <= 0 then return out end
  flatten_entries(redis.call('XREADGROUP', 'GROUP', WH_GROUP, node, 'COUNT', count, 'STREAMS', WH_STREAM, '0'), out)
  if #out == 3 then
    flatten_entries(redis.call('XREADGROUP', 'GROUP', WH_GROUP, node, 'COUNT', count, 'STREAMS', WH_STREAM, '>'), out)
  end
  return out
end

local function webhook_ack(keys, args)
  if #args == 0 then return 0 end
  redis.call('XACK', keys[1], WH_GROUP, unpack(args))
  return redis.call('XDEL', keys[1], unpack(args))
end

local function version()
  return {VERSION, MAXLEN, TTL_MS, MAX_BYTES, IDEM_MS, NS_HASH, WH_MAX}
end

redis.register_function('hub_publish', publish)
redis.register_function{function_name = 'hub_version', callback = version, flags = {'no-writes'}}
redis.register_function{function_name = 'hub_read', callback = read, flags = {'no-writes'}}
redis.register_function('hub_presence', presence)
redis.register_function('hub_presence_drop', presence_drop)
redis.register_function('hub_presence_lease', presence_lease)
redis.register_function('hub_webhook_take', webhook_take)
redis.register_function('hub_webhook_ack', webhook_ack)
redis.register_function{function_name = 'hub_presence_read', callback = presence_read, flags = {'no-writes'}}
redis.register_function{function_name = 'hub_rewind', callback = rewind, flags = {'no-writes'}}
redis.register_function{function_name = 'hub_recover', callback = recover, flags = {'no-writes'}}
