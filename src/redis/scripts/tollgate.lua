#!lua name=tollgate
-- tollgate's Redis Functions library (Redis 7+): loaded once with FUNCTION LOAD, so
-- its helpers are defined once, not on every call. Each call loads each scope hash
-- it touches with ONE HMGET (however many of its requests touch it), decides on the
-- parsed values, and writes each changed scope with ONE HSET when it ends. `reserve`
-- and `commit` take a batch of requests, decided one after the other; a request
-- meets a corrupt field before it took or settled anything, and fails alone with a
-- `CORRUPT` error naming the key and field (Redis does not undo a function's writes:
-- nothing a failed request did is left half done).
--
-- A scope hash keeps its numbers (rate buckets, concurrency, period, request and
-- token counts) packed in one field, `n`: 24 little-endian doubles (all integers
-- below 2^53, so exact), in the order of `NUM` below. Turning hash fields into Lua
-- values is what costs in Redis (about 0.3 µs a field); one packed field is one
-- value. Money stays in its own decimal-string fields (`used`, `held`, `spent`, and
-- `p_spent` for the previous period), readable with HGET, never rounded.
--
-- Redis TIME is the only clock. Times are microseconds since the epoch (exact in a
-- double until the year 2255); bucket backlogs are nanoseconds (exact to 104 days of
-- backlog). Money is int64 pico-dollars kept as decimal strings and added exactly by
-- splitting it into two doubles (`madd`), never rounded through one double.
--
-- Functions (their KEYS, ARGV and replies are documented above each one): reserve,
-- commit, release, renew, follow, policy_cas.

local now = 0

local function clock()
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- An integral double as a decimal string, exactly (`tostring` keeps 14 digits).
local function fmt(x)
  return string.format('%d', x)
end

local function bad(key, field, value)
  return redis.error_reply('CORRUPT ' .. key .. ' ' .. field .. '=' .. tostring(value))
end

-- A number field; absent is 0; anything else is corrupt.
local function num(key, field, raw)
  if raw == false or raw == nil then return 0 end
  local n = tonumber(raw)
  if n == nil then error(bad(key, field, raw)) end
  return n
end

-- An integer money field, checked but kept as a string.
local function money(key, field, raw)
  if raw == false or raw == nil then return '0' end
  if not string.match(raw, '^%-?%d+$') then error(bad(key, field, raw)) end
  return raw
end

-- Exact int64 arithmetic on decimal strings: a value is hi * 1e9 + lo with
-- 0 <= lo < 1e9, both exact in doubles; results are pinned to the int64 range.
local E9 = 1000000000
local function split(s)
  local negative = string.sub(s, 1, 1) == '-'
  local digits = negative and string.sub(s, 2) or s
  local n = #digits
  local hi = n > 9 and tonumber(string.sub(digits, 1, n - 9)) or 0
  local lo = tonumber(string.sub(digits, math.max(1, n - 8)))
  if negative then
    hi, lo = -hi, -lo
    if lo < 0 then hi, lo = hi - 1, lo + E9 end
  end
  return hi, lo
end

local MAX_HI, MAX_LO = 9223372036, 854775807 -- i64::MAX = 9223372036 * 1e9 + 854775807

local function join(hi, lo)
  if hi > MAX_HI or (hi == MAX_HI and lo > MAX_LO) then return '9223372036854775807' end
  if hi < -MAX_HI - 1 or (hi == -MAX_HI - 1 and lo < E9 - MAX_LO - 1) then
    return '-9223372036854775808'
  end
  if hi >= 0 then
    if hi == 0 then return fmt(lo) end
    return fmt(hi) .. string.format('%09d', lo)
  end
  if lo == 0 then return fmt(hi) .. '000000000' end
  local h, l = -hi - 1, E9 - lo
  if h == 0 then return '-' .. fmt(l) end
  return '-' .. fmt(h) .. string.format('%09d', l)
end

local function madd(a, b)
  if b == '0' then return a end
  -- Both below 10^15 in magnitude (every counter under $1,000 and every request's
  -- cost, in pico-dollars): the sum is below 2^53, so one double adds it exactly.
  if #a <= 15 and #b <= 15 then return fmt(tonumber(a) + tonumber(b)) end
  local ah, al = split(a)
  local bh, bl = split(b)
  local hi, lo = ah + bh, al + bl
  if lo >= E9 then hi, lo = hi + 1, lo - E9 end
  return join(hi, lo)
end

local function neg(s)
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  if s == '0' then return '0' end
  return '-' .. s
end

-- Compare two canonical decimal integer strings exactly: -1, 0 or 1.
local function cmp(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then return na and -1 or 1 end
  if na then a = string.sub(a, 2); b = string.sub(b, 2) end
  local r
  if #a ~= #b then
    r = (#a < #b) and -1 or 1
  elseif a == b then
    r = 0
  else
    r = (a < b) and -1 or 1
  end
  if na then r = -r end
  return r
end

-- q, r with a = q * b + r and 0 <= r < b, exactly, for non-negative integers below
-- 2^53 (a double's quotient can be one off near an integer; the remainder fixes it).
local function divmod(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  while r < 0 do q = q - 1; r = r + b end
  while r >= b do q = q + 1; r = r - b end
  return q, r
end

local function divceil(a, b)
  local q, r = divmod(a, b)
  if r > 0 then q = q + 1 end
  return q
end

-- floor(a * b / c), exactly, although a * b may not fit a double's 53 bits (a, b, c
-- and the result must): binary long multiplication over the bits of b, keeping the
-- remainder below c.
local function muldiv(a, b, c)
  local qa, ra = divmod(a, c)
  local bits, x = {}, b
  while x > 0 do
    local bit = x % 2
    bits[#bits + 1] = bit
    x = (x - bit) / 2
  end
  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q, r = q * 2, r * 2
    if r >= c then q, r = q + 1, r - c end
    if bits[i] == 1 then
      r = r + ra
      if r >= c then q, r = q + 1, r - c end
    end
  end
  return qa * b + q
end

-- The numbers of a scope hash, packed in its field `n`, in this order.
local NUM = {
  'rpm', 'rpm@', 'rpm#', 'rpm^', 'rpm-',
  'rpd', 'rpd@', 'rpd#', 'rpd^', 'rpd-',
  'tpm', 'tpm@', 'tpm#', 'tpm^', 'tpm-',
  'conc', 'ps', 'pe', 'pk', 'pks', 'req', 'in', 'out', 'alerted',
}
local AT = {}
for i = 1, #NUM do AT[NUM[i]] = i end -- (`ipairs` is not there while the library loads)
-- (Written out: the string library is not there while the library loads.)
local PACKED = '<dddddddddddddddddddddddd'
local PACKED_BYTES = 8 * #NUM

-- The scopes one function call has loaded, by key and in load order: a call loads
-- each scope hash once, however many requests (or purged holds) touch it, and writes
-- each once when it ends (`write_scopes`).
local loaded, load_order = {}, {}
-- The flags of each hash tag the call has read (see `flags_of`).
local flags_read = {}

-- A scope hash, loaded with one HMGET the first time a call asks for it: `s.v` its
-- numbers (by `AT[name]`), `s.used`, `s.held`, `s.spent` its money. A hash never
-- written reads as zeros (no period yet, no alert yet). Changes are queued with `put`
-- (string fields) or by changing `s.v` and setting `s.changed`; `keep_alive` asks for
-- the hash's idle TTL to be renewed; `write_scopes` writes each changed hash with one HSET.
-- (A period end `pe` of 0 marks a scope whose period has not started.)
local function scope(key)
  local cached = loaded[key]
  if cached then return cached end
  local v = redis.call('HMGET', key, 'n', 'used', 'held', 'spent', 'rules')
  local s = { key = key, out = {}, dirty = false, rules = v[5] }
  local packed = v[1]
  if packed then
    if #packed ~= PACKED_BYTES then error(bad(key, 'n', #packed .. ' bytes')) end
    local values = { struct.unpack(PACKED, packed) }
    values[#NUM + 1] = nil -- struct.unpack also returns the next position
    for i = 1, #NUM do
      local x = values[i]
      -- NaN, infinities and fractions are corrupt: every number here is an integer
      -- (x % 1 is NaN for the first two).
      if x % 1 ~= 0 then
        error(bad(key, NUM[i], x))
      end
    end
    s.v = values
  else
    local values = {}
    for i = 1, #NUM do values[i] = 0 end
    values[AT.alerted] = -1
    s.v, s.fresh = values, true
  end
  s.used = money(key, 'used', v[2])
  s.held = money(key, 'held', v[3])
  s.spent = money(key, 'spent', v[4])
  loaded[key] = s
  load_order[#load_order + 1] = s
  return s
end

local function get(s, name)
  return s.v[AT[name]]
end

local function set(s, name, x)
  s.v[AT[name]] = x
  s.changed = true
end

-- The string fields a later request of the same call reads back from `s`.
local READ_BACK = { used = true, held = true, spent = true, rules = true }

local function put(s, field, value)
  s.out[field] = value
  if READ_BACK[field] then s[field] = value end
  s.dirty = true
end

-- The scope is in use: renew its idle TTL (ms; none when absent) when the call ends.
local function keep_alive(s, idle)
  if idle and idle > (s.renew or 0) then s.renew = idle end
end

-- Start a function call with nothing loaded.
local function begin()
  loaded, load_order, flags_read = {}, {}, {}
end

-- Write every changed scope the call loaded (one HSET each), renew the idle TTLs
-- asked for and the TTL of each holds zset the call added to: the end of every
-- function that loads scopes.
local function write_scopes()
  for _, f in pairs(flags_read) do
    if f.holds then redis.call('PEXPIRE', f.holds, f.holds_ttl) end
  end
  for _, s in ipairs(load_order) do
    if s.changed then put(s, 'n', struct.pack(PACKED, unpack(s.v))) end
    if s.dirty then
      local fields, n = {}, 0
      for field, value in pairs(s.out) do
        fields[n + 1] = field
        fields[n + 2] = value
        n = n + 2
      end
      redis.call('HSET', s.key, unpack(fields, 1, n))
    end
    if s.renew and s.renew > 0 then redis.call('PEXPIRE', s.key, s.renew) end
  end
  loaded, load_order, flags_read = {}, {}, {}
end

-- Rate buckets. Per bucket `name` (rpm, rpd, tpm) a scope keeps `name`, the backlog in
-- ns as of `name@` (µs); `name#`, the interval (ns per unit) of the rule the bucket is
-- in (0: no limit); `name^`, its epoch (+1 on a rescale, +2 when cleared or its limit
-- removed, mod 2^16); and `name-`, the nanoseconds ever refunded out of it (mod 2^50:
-- only differences are used, and a wrapped difference is smaller, so a wrap can only
-- make a refund smaller). Only `reserve` (which carries the current policy) changes a
-- bucket's interval; commits and releases use the stored one.
local EPOCHS = 65536
local REFUNDED = 1125899906842624
local BUCKETS = { 'rpm', 'rpd', 'tpm' }
local REQUEST_BUCKETS = { 'rpm', 'rpd' }

local function bucket(s, name)
  local at, v = AT[name], s.v
  return {
    name = name,
    backlog = math.max(0, v[at] - (now - v[at + 1]) * 1000),
    interval = v[at + 2],
    epoch = v[at + 3],
    refunded = v[at + 4],
  }
end

local function put_bucket(s, b)
  local at, v = AT[b.name], s.v
  v[at], v[at + 1], v[at + 2], v[at + 3], v[at + 4] = b.backlog, now, b.interval, b.epoch, b.refunded
  s.changed = true
end

-- Bring a bucket to the current rule's interval (reserve only). A changed limit
-- re-expresses the backlog, so the units already taken count the same; a limit added
-- where there was none starts full; true if anything changed.
local function conform(b, interval)
  if b.interval == interval then return false end
  if interval == 0 or b.interval == 0 then
    b.backlog = 0
    b.epoch = (b.epoch + 2) % EPOCHS
  else
    b.backlog = muldiv(b.backlog, interval, b.interval)
    b.epoch = (b.epoch + 1) % EPOCHS
  end
  b.interval = interval
  return true
end

-- Give back up to `want` units of `hold` (units, ahead, seen, epoch, interval: what
-- the take recorded) taken at `take_us`: never more of it than can still be undrained.
-- True if the bucket changed.
local function refund(b, hold, take_us, want)
  if not hold or want <= 0 or hold.units <= 0 then return false end
  local interval = b.interval
  if interval == 0 or b.backlog == 0 then return false end
  local elapsed = math.max(0, (now - take_us) * 1000)
  local give = 0
  if b.epoch == hold.epoch and interval == hold.interval then
    -- No rule change since the take. FIFO: what was ahead of the hold drains first;
    -- every refund since the take may have been ahead of it (never more than was).
    local added = hold.units * interval
    local ahead = math.min((b.refunded - hold.seen) % REFUNDED, hold.ahead)
    local drained = math.min(math.max(elapsed - (hold.ahead - ahead), 0), added)
    give = math.min(want * interval, added - drained)
  elseif b.epoch == (hold.epoch + 1) % EPOCHS then
    -- One rescale since the take: each unit is one new interval long, and at most as
    -- many units drained as the faster of the two rules lets through.
    local fastest = math.min(interval, hold.interval)
    if fastest > 0 then
      local left = math.max(0, hold.units - divceil(elapsed, fastest))
      give = math.min(want, left) * interval
    end
  end
  -- Otherwise (two or more rule changes, or cleared) nothing of the hold is known.
  if give <= 0 then return false end
  b.backlog = math.max(0, b.backlog - give)
  b.refunded = (b.refunded + give) % REFUNDED
  return true
end

-- Charge `units` whether or not they fit (usage beyond a hold, or a commit whose hold
-- expired): debt that later takes wait out, at the bucket's current interval.
local function charge(b, units)
  if units <= 0 or b.interval == 0 then return false end
  b.backlog = b.backlog + units * b.interval
  return true
end

-- Civil date from days since the epoch (H. Hinnant's algorithm), for month bounds.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local DAY = 86400000000

-- [start, end) of the period containing now; kind 0 forever, 1 day, 2 month, 3 custom.
local function bounds(kind, seconds)
  if kind == 0 then return 0, -1 end
  if kind == 1 or kind == 3 then
    local len = (kind == 1) and DAY or seconds * 1000000
    local start = now - now % len
    return start, start + len
  end
  local y, m = civil(math.floor(now / DAY))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY
end

-- The period of a scope: started anew when now has passed the stored one. Holds in
-- flight carry over (they stay in `used` and `held`); the ended period's totals become
-- `p_*`. The scope stores its period kind (`pk`, and `pks` seconds for a custom one):
-- only `policy` (a reserve or a policy change, which carry the current policy) may
-- change it: the new kind's period starts at once, carrying what the current one
-- counted, after closing a stored period that had already ended (as the in-memory
-- engine does). Every other caller rolls by the stored kind, and passes its own only
-- for a scope that has none yet. Queues its changes on `s` (written by `write_scopes`).
-- Returns the end of the current period.
local function roll(s, kind, seconds, policy)
  local stored_start, stored_end = get(s, 'ps'), get(s, 'pe')
  -- A period end of 0 means none yet (a forever span ends at -1).
  if stored_end ~= 0 then
    local stored_kind, stored_seconds = get(s, 'pk'), get(s, 'pks')
    local changing = policy and (stored_kind ~= kind or stored_seconds ~= seconds)
    if not changing then kind, seconds = stored_kind, stored_seconds end
    local ended = stored_end > 0 and now >= stored_end
    -- Not ended and no new kind: the stored period is the current one (if Redis's
    -- clock went back before its start, it stays current until it ends).
    if not ended and not changing then return stored_end end
    if ended then
      -- The stored period ended: its totals move aside, its spend leaves `used`.
      s.used = madd(s.used, neg(s.spent))
      put(s, 'used', s.used)
      put(s, 'p_start', fmt(stored_start)); put(s, 'p_spent', s.spent); put(s, 'p_req', fmt(get(s, 'req')))
      put(s, 'p_in', fmt(get(s, 'in'))); put(s, 'p_out', fmt(get(s, 'out')))
      set(s, 'req', 0); set(s, 'in', 0); set(s, 'out', 0); set(s, 'alerted', -1)
      s.spent = '0'
      put(s, 'spent', '0')
    end
  end
  local start, finish = bounds(kind, seconds)
  set(s, 'ps', start); set(s, 'pe', finish); set(s, 'pk', kind); set(s, 'pks', seconds)
  return finish
end

-- The flags of a hash tag (`<tag>:flags`, which never expires): the workspace's
-- generation (+1 each time it is deleted), whether it is deleted now, a key's
-- revocation, and `sweep`: no hold in the tag's holds zset expires before this time
-- (ms; absent: the zset may hold anything). Every call reads them with one HMGET.
-- A call reads each tag's flags once (`flags_read`, reset by `begin`), and each key's
-- revocation once more when a later request of the call names another key.

local function flags_of(flags, key_id)
  local f = flags_read[flags]
  if not f then
    local v = redis.call('HMGET', flags, 'gen', 'deleted', 'sweep', 'revoked:' .. key_id)
    f = {
      key = flags,
      gen = num(flags, 'gen', v[1]),
      deleted = v[2] == '1',
      sweep = v[3] and num(flags, 'sweep', v[3]) or -1,
      revoked = { [key_id] = v[4] == '1' },
    }
    flags_read[flags] = f
  elseif f.revoked[key_id] == nil then
    f.revoked[key_id] = redis.call('HGET', flags, 'revoked:' .. key_id) == '1'
  end
  return f
end

-- A reservation record: one string (one SET with its TTL, one GET), packed as
-- `RECORD_HEAD` (t: take time in µs, n: levels, g: the tag's generation at the take,
-- then the length of c, the cost in pico-dollars as a decimal string), c, then per
-- level the length of its scope key, the key, and what the level holds: 16 packed
-- doubles (`HOLD`), "slot" then per bucket rpm, rpd, tpm "units, ahead, seen, epoch,
-- interval".
local RECORD_HEAD = '<dddd'
local KEY_LENGTH = '<d'
local HOLD = '<dddddddddddddddd'
local HOLD_BYTES = 128

-- Most levels one record holds (a group's levels and the budgets beyond their first).
local MAX_LEVELS = 16

-- Unpack `format` from `raw` at `at`; a record cut short is corrupt.
local function unpack_at(rkey, raw, format, bytes, at)
  if at + bytes - 1 > #raw then error(bad(rkey, 'record', #raw .. ' bytes')) end
  return struct.unpack(format, raw, at)
end

-- What level `i` of record `rkey` holds, from its 16 packed doubles: all integers
-- (a NaN or a fraction is corrupt: caught before anything is settled or released).
local function held_level(rkey, i, key, h)
  for j = 1, 16 do
    if h[j] % 1 ~= 0 then error(bad(rkey, 'h' .. i, h[j])) end
  end
  local level = { key = key, slot = h[1] }
  for j = 1, 3 do
    local b = 1 + (j - 1) * 5
    if h[b + 5] > 0 then -- the take's interval: the bucket had a limit
      level[BUCKETS[j]] = { units = h[b + 1], ahead = h[b + 2], seen = h[b + 3], epoch = h[b + 4], interval = h[b + 5] }
    end
  end
  return level
end

-- A record written by tollgate before records were one string: a hash with fields t,
-- c, n, g and k<i>, h<i> per level. Read so that holds in flight across an upgrade
-- are still given back exactly.
local LEGACY_FIELDS = { 't', 'c', 'n', 'g' }
for i = 1, MAX_LEVELS do
  LEGACY_FIELDS[#LEGACY_FIELDS + 1] = 'k' .. i
  LEGACY_FIELDS[#LEGACY_FIELDS + 1] = 'h' .. i
end

local function read_legacy_record(rkey)
  local r = redis.call('HMGET', rkey, unpack(LEGACY_FIELDS))
  if r[1] == false then return nil end
  local record = { take = num(rkey, 't', r[1]), cost = money(rkey, 'c', r[2]), gen = num(rkey, 'g', r[4]), levels = {} }
  local n = num(rkey, 'n', r[3])
  if n < 0 or n > MAX_LEVELS or n % 1 ~= 0 then error(bad(rkey, 'n', n)) end
  for i = 1, n do
    local key, raw = r[3 + 2 * i], r[4 + 2 * i]
    if not key then error(bad(rkey, 'k' .. i, 'missing')) end
    if not raw or #raw ~= HOLD_BYTES then error(bad(rkey, 'h' .. i, raw and #raw .. ' bytes' or 'missing')) end
    record.levels[i] = held_level(rkey, i, key, { struct.unpack(HOLD, raw) })
  end
  return record
end

local function read_record(rkey)
  local raw = redis.pcall('GET', rkey)
  if type(raw) == 'table' and raw.err and string.find(raw.err, 'WRONGTYPE', 1, true) then
    return read_legacy_record(rkey)
  elseif type(raw) == 'table' then
    error(raw)
  end
  if not raw then return nil end
  local take, n, gen, cost_length, at = unpack_at(rkey, raw, RECORD_HEAD, 32, 1)
  if n < 0 or n > MAX_LEVELS or n % 1 ~= 0 or cost_length % 1 ~= 0 or cost_length < 1 then
    error(bad(rkey, 'record', 'n=' .. n))
  end
  local cost = money(rkey, 'c', string.sub(raw, at, at + cost_length - 1))
  at = at + cost_length
  local record = { take = take, cost = cost, gen = gen, levels = {} }
  for i = 1, n do
    local key_length
    key_length, at = unpack_at(rkey, raw, KEY_LENGTH, 8, at)
    if key_length % 1 ~= 0 or key_length < 1 or at + key_length + HOLD_BYTES - 1 > #raw then
      error(bad(rkey, 'k' .. i, 'length ' .. key_length))
    end
    local key = string.sub(raw, at, at + key_length - 1)
    record.levels[i] = held_level(rkey, i, key, { struct.unpack(HOLD, raw, at + key_length) })
    at = at + key_length + HOLD_BYTES
  end
  return record
end

-- Give back everything a record holds (all scopes loaded and parsed first), then
-- delete it and drop it from the holds. A record of a workspace deleted since its
-- take (another generation) gives nothing back: its counters were dropped, and a
-- re-created workspace starts from zero.
local function release_parsed(rkey, record, holds, id, gen, deleted)
  if record and record.gen == gen and not deleted then
    local scopes = {}
    for i, level in ipairs(record.levels) do scopes[i] = scope(level.key) end
    local back = neg(record.cost)
    for i, level in ipairs(record.levels) do
      local s = scopes[i]
      for _, name in ipairs(BUCKETS) do
        local hold = level[name]
        if hold then
          local b = bucket(s, name)
          if refund(b, hold, record.take, hold.units) then put_bucket(s, b) end
        end
      end
      if level.slot > 0 then set(s, 'conc', get(s, 'conc') - level.slot) end
      put(s, 'used', madd(s.used, back))
      put(s, 'held', madd(s.held, back))
    end
  end
  if record then redis.call('DEL', rkey) end
  redis.call('ZREM', holds, id)
end

-- No hold expires before this (ms): the `sweep` of a tag whose holds zset is empty.
local NO_HOLDS = 4503599627370496

-- Release holds whose owner let them expire (crashed, or never committed), at most
-- 16 per call, once the tag's `sweep` time has come; then move `sweep` to the
-- earliest expiry left. Calls before it skip the zset: in steady traffic a tag is
-- swept about once per reservation TTL, not on every call.
local function purge(holds, record_base, flags)
  local now_ms = math.floor(now / 1000)
  if flags.sweep > now_ms then return end
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', fmt(now_ms), 'LIMIT', 0, 16)
  for _, id in ipairs(expired) do
    local rkey = record_base .. id
    local ok = pcall(function()
      release_parsed(rkey, read_record(rkey), holds, id, flags.gen, flags.deleted)
    end)
    if not ok then
      -- A corrupt record (or a corrupt counter it names) cannot say what to give
      -- back. Drop it rather than fail every call on this tag until it expires: its
      -- holds stay counted, which can refuse requests but never overspend.
      redis.call('DEL', rkey)
      redis.call('ZREM', holds, id)
    end
  end
  -- The earliest expiry left (still due when more than 16 had expired: the next
  -- call sweeps again). Renewals and commits only move expiries later or away, and
  -- every ZADD lowers `sweep` to its own, so it stays a lower bound.
  local first = redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')
  local sweep = first[2] and tonumber(first[2]) or NO_HOLDS
  redis.call('HSET', flags.key, 'sweep', fmt(sweep))
  flags.sweep = sweep
end

-- Add a hold to the tag's holds zset, expiring at `expiry` (ms), keeping `sweep` a
-- lower bound of every expiry in it. The zset's own TTL is renewed once per call
-- (`write_scopes`), however many holds the call adds.
local function add_hold(holds, id, expiry, record_ttl, flags)
  redis.call('ZADD', holds, fmt(expiry), id)
  flags.holds = holds
  if record_ttl > (flags.holds_ttl or 0) then flags.holds_ttl = record_ttl end
  if expiry < flags.sweep then
    redis.call('HSET', flags.key, 'sweep', fmt(expiry))
    flags.sweep = expiry
  end
end

-- The requests of a reserve or commit call. ARGV[1] is their number; then each
-- request has `head` arguments, the last its number of groups; each group one hash
-- tag's keys (holds zset, record, commit marker, flags, then one scope hash per level)
-- and arguments (3: record_base, then one the function names, then the level count;
-- then `per_level` per level). Returns the requests, or nil when KEYS and ARGV do not
-- add up (then nothing of the call is run).
local function requests_of(KEYS, ARGV, head, per_level)
  local count = tonumber(ARGV[1])
  if not count or count < 1 or count % 1 ~= 0 then return nil end
  local requests, k, a = {}, 0, 1
  for r = 1, count do
    local group_count = tonumber(ARGV[a + head])
    if not group_count or group_count < 1 or group_count % 1 ~= 0 then return nil end
    local request = { args_at = a, groups = {} }
    a = a + head
    for g = 1, group_count do
      local levels = tonumber(ARGV[a + 3])
      if not levels or levels < 0 or levels % 1 ~= 0 then return nil end
      request.groups[g] = {
        holds = KEYS[k + 1], record = KEYS[k + 2], marker = KEYS[k + 3], flags_key = KEYS[k + 4],
        keys_at = k + 4, args_at = a, levels = levels,
      }
      k = k + 4 + levels
      a = a + 3 + per_level * levels
      if k > #KEYS or a > #ARGV then return nil end
    end
    requests[r] = request
  end
  if k ~= #KEYS or a ~= #ARGV then return nil end
  return requests
end

-- Run `one` for each request of a call, in order, each decided on what the requests
-- before it left: one reply per request, or {-1, message} for a request that failed
-- (a corrupt record or counter, a duplicate id): it alone fails, having taken or
-- settled nothing (both `reserve_one` and `commit_one` read and check everything
-- before they change anything but what a refusal would keep: periods rolled,
-- buckets brought to new rules). Every scope is written once, at the end.
local function run_requests(KEYS, ARGV, requests, one)
  local replies = {}
  for r, request in ipairs(requests) do
    local ok, reply = pcall(one, KEYS, ARGV, request)
    if not ok then
      local message = type(reply) == 'table' and (reply.err or reply.message) or tostring(reply)
      reply = { -1, message }
    end
    replies[r] = reply
  end
  write_scopes()
  return replies
end

-- reserve: requests' worst cases, each on every level of one or more hash tags (a
-- standalone server takes a request's workspace and org tags in one call, and
-- concurrent requests of one instance in one call; a cluster one call per tag and
-- request), each all or nothing. Per request, ARGV: id, ttl_ms, cost, record_ttl_ms,
-- requests (1, or a lease's n: rpm/rpd take n units, max_concurrent n slots), keep
-- (percent of every rate limit a take must leave free: 0, or a lease's), the number of
-- groups, then per group: record_base, key id (the workspace group: its
-- revocation and its workspace's deletion are checked; "" for none), the level
-- count, then 12 per level:
-- rpm_interval rpm_limit rpd_interval rpd_limit tpm_interval tpm_limit tpm_units
-- max_concurrent budget_headroom("" = none) period_kind period_seconds idle_ttl_ms.
-- KEYS, per request and group: holds zset, this reservation's record, its commit
-- marker, the tag's flags, then one scope hash per level. Returns per request {1, per
-- group {per level: rpm_rem rpm_reset rpd_rem rpd_reset tpm_rem tpm_reset (-1 where
-- no limit), then the tag's generation}} or, for the first refusal, {0, group,
-- {level, kind, ...}} with nothing taken on any group; kind 6: the key was revoked,
-- 7: its workspace was deleted (by any instance).
local function reserve_one(KEYS, ARGV, request)
  local a0 = request.args_at
  local id, ttl, cost, record_ttl = ARGV[a0 + 1], tonumber(ARGV[a0 + 2]), ARGV[a0 + 3], tonumber(ARGV[a0 + 4])
  -- A lease (n > 1) takes n requests at once, and only while every limit keeps
  -- `keep` percent free for requests that come one by one.
  local n, keep = tonumber(ARGV[a0 + 5]), tonumber(ARGV[a0 + 6])
  local groups = request.groups
  for g, group in ipairs(groups) do
    local key_id = ARGV[group.args_at + 2]
    local flags = flags_of(group.flags_key, key_id)
    group.flags = flags
    purge(group.holds, ARGV[group.args_at + 1], flags)
    if redis.call('EXISTS', group.record, group.marker) > 0 then
      error(redis.error_reply('DUPLICATE reservation id ' .. id))
    end
    if key_id ~= '' then
      if flags.revoked[key_id] then return { 0, g, { 1, 6 } } end
      if flags.deleted then return { 0, g, { 2, 7 } } end
    end
    -- A record holds at most MAX_LEVELS levels: refuse more than it could be read back.
    if group.levels > MAX_LEVELS then
      error(redis.error_reply('TOOMANYLEVELS ' .. group.levels .. ' > ' .. MAX_LEVELS))
    end
  end

  -- Pass 1: load every scope and decide. A refusal keeps what it decided about the
  -- scopes it read (periods rolled or moved to a new kind, buckets brought to new
  -- rules), never a take; a corrupt value fails the request before it took anything.
  local plan = {}
  for g, group in ipairs(groups) do
    for i = 1, group.levels do
      local a = group.args_at + 3 + (i - 1) * 12
      local s = scope(KEYS[group.keys_at + i])
      keep_alive(s, tonumber(ARGV[a + 12]))
      -- The rules the buckets were last brought to: when they are the same, buckets of
      -- limits that do not apply need no look.
      local signature = ARGV[a + 1] .. ':' .. ARGV[a + 3] .. ':' .. ARGV[a + 5]
      local rules_changed = s.rules ~= signature
      local finish = roll(s, tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11]), true)
      -- Every bucket is brought to the current rules before any is decided on: the
      -- signature then names what all three follow, even if this request is refused.
      local limited = {}
      for j = 1, 3 do
        local limit = tonumber(ARGV[a + 2 * j])
        if limit > 0 or rules_changed then
          local interval = limit > 0 and tonumber(ARGV[a + 2 * j - 1]) or 0
          local b = bucket(s, BUCKETS[j])
          if conform(b, interval) then put_bucket(s, b) end
          if limit > 0 then limited[j] = { b = b, limit = limit, interval = interval } end
        end
      end
      if rules_changed then put(s, 'rules', signature) end
      local entry = { s = s, takes = {}, slot = false }
      for j = 1, 3 do
        local rule = limited[j]
        if rule then
          local b, limit, interval = rule.b, rule.limit, rule.interval
          local units = j == 3 and tonumber(ARGV[a + 7]) or n
          local tolerance = (limit - math.floor(limit * keep / 100)) * interval
          local backlog = b.backlog
          if units > limit then
            local free = math.floor(math.max(0, tolerance - backlog) / interval)
            return { 0, g, { i, j, fmt(math.min(free, limit)), fmt(backlog), -1 } }
          end
          local after = backlog + units * interval
          if after > tolerance then
            local free = math.floor(math.max(0, tolerance - backlog) / interval)
            return { 0, g, { i, j, fmt(math.min(free, limit)), fmt(backlog), fmt(after - tolerance) } }
          end
          entry.takes[j] = {
            bucket = b, units = units, after = after,
            remaining = math.floor((tolerance - after) / interval),
          }
        end
      end
      local max_conc = tonumber(ARGV[a + 8])
      if max_conc > 0 then
        local in_flight = get(s, 'conc')
        if in_flight + n > max_conc then return { 0, g, { i, 4, fmt(in_flight) } } end
        entry.slot = true
      end
      local headroom = ARGV[a + 9]
      if headroom ~= '' and cmp(s.used, headroom) > 0 then
        return { 0, g, { i, 5, s.used, fmt(finish) } }
      end
      plan[#plan + 1] = entry
    end
  end

  -- Pass 2: take everything and record what was taken, in units and in the terms a
  -- refund needs (backlog ahead, refunds seen, epoch and interval at the take). The
  -- scopes change in memory first; then each group's record is written: a record
  -- names exactly what its group took, so a release by id (after a lost reply) gives
  -- back exactly that.
  local reply, next_entry = { 1 }, 1
  local expiry = math.floor(now / 1000) + ttl
  for _, group in ipairs(groups) do
    local gen = group.flags.gen
    local group_reply = {}
    local record = { struct.pack(RECORD_HEAD, now, group.levels, gen, #cost), cost }
    for _ = 1, group.levels do
      local entry = plan[next_entry]
      next_entry = next_entry + 1
      local s = entry.s
      local h = { entry.slot and n or 0 }
      for j = 1, 3 do
        local take = entry.takes[j]
        if take then
          local b = take.bucket
          h[#h + 1] = take.units; h[#h + 1] = b.backlog; h[#h + 1] = b.refunded
          h[#h + 1] = b.epoch; h[#h + 1] = b.interval
          b.backlog = take.after
          put_bucket(s, b)
          group_reply[#group_reply + 1] = take.remaining; group_reply[#group_reply + 1] = fmt(take.after)
        else
          h[#h + 1] = 0; h[#h + 1] = 0; h[#h + 1] = 0; h[#h + 1] = 0; h[#h + 1] = 0
          group_reply[#group_reply + 1] = -1; group_reply[#group_reply + 1] = -1
        end
      end
      if entry.slot then set(s, 'conc', get(s, 'conc') + n) end
      put(s, 'used', madd(s.used, cost))
      put(s, 'held', madd(s.held, cost))
      record[#record + 1] = struct.pack(KEY_LENGTH, #s.key) .. s.key .. struct.pack(HOLD, unpack(h))
    end
    redis.call('SET', group.record, table.concat(record), 'PX', record_ttl)
    add_hold(group.holds, id, expiry, record_ttl, group.flags)
    group_reply[#group_reply + 1] = fmt(gen)
    reply[#reply + 1] = group_reply
  end
  return reply
end


-- commit: settle reservations, each on every level of one or more hash tags (groups
-- and requests as for reserve): refund unused tokens and money, charge overage as
-- debt, count the request in the current period. Idempotent by reservation id: a
-- retried commit finds its marker and charges nothing again. KEYS, per request and
-- group: holds zset, the record, the commit marker, the tag's flags, then one scope
-- hash per level. Per request, ARGV: id, done_ttl_ms, reserved_cost, cost, input,
-- output, requests (1, or how many of a lease's it served: the rest of its rpm/rpd
-- units are given back), the number of groups, then per group: record_base, generation (the tag's,
-- from the reserve; "" = unknown), the level count, then 7 per level: tpm_used_units period_kind period_seconds tally idle_ttl_ms
-- budget_limit("" = none) lowest_alert_percent. Buckets and periods follow what the
-- scope hashes store (the rules in force now), not the rules the reservation was
-- admitted under; the period kind is only used for a hash that has none yet.
-- Returns per request one reply per group, each {code, then per level:
-- alerted_before alerted_now spent} with code 1
-- settled, 2 already committed, 3 committed after the hold had expired (usage charged
-- in full as debt, the request counted once in RPM and RPD), 4 the workspace was
-- deleted since the reserve (nothing settled on this tag: its counters are gone, and a
-- re-created workspace starts from zero); alerted_* are the percentages of the budget
-- already reported before this commit and reached now (-1 -1 when this commit reached
-- nothing new), so each alert fires once per period across every instance.
-- A commit's first pass on one group: read its marker, record and scopes and check
-- them, settling nothing, so a corrupt value on any group of the request fails it
-- before any group is settled. Returns what `settle_group` needs: the outcome code
-- (see `commit`), and for 1 and 3 the record and the loaded scopes.
local function prepare_group(KEYS, ARGV, group)
  local record_base, own_gen = ARGV[group.args_at + 1], ARGV[group.args_at + 2]
  local flags = flags_of(group.flags_key, '')
  purge(group.holds, record_base, flags)
  if redis.call('EXISTS', group.marker) == 1 then return { code = 2 } end

  local record = read_record(group.record)
  local present = record ~= nil
  local gen = flags.gen
  if flags.deleted or (own_gen ~= '' and tonumber(own_gen) ~= gen) or (present and record.gen ~= gen) then
    return { code = 4 }
  end
  local levels = group.levels
  if present and #record.levels ~= levels then
    error(redis.error_reply('CORRUPT ' .. group.record .. ' n=' .. #record.levels .. ', expected ' .. levels))
  end
  local scopes = {}
  for i = 1, levels do
    local a = group.args_at + 3 + (i - 1) * 7
    local s = scope(KEYS[group.keys_at + i])
    roll(s, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), false)
    scopes[i] = s
  end
  return { code = present and 1 or 3, record = record, scopes = scopes }
end

-- A commit's second pass on one group, which cannot fail: settle what `prepare_group`
-- read, drop the record and set the commit marker.
local function settle_group(ARGV, group, plan, id, done_ttl, reserved, cost, input, output, requests)
  if plan.code == 2 then return { 2 } end
  if plan.code == 4 then
    redis.call('DEL', group.record)
    redis.call('ZREM', group.holds, id)
    redis.call('SET', group.marker, '1', 'PX', done_ttl)
    return { 4 }
  end
  local record, scopes, levels = plan.record, plan.scopes, group.levels
  local present = record ~= nil
  local alerts = {}
  local take_us = present and record.take or 0
  for i = 1, levels do
    local a = group.args_at + 3 + (i - 1) * 7
    local s = scopes[i]
    local used_units = tonumber(ARGV[a + 1])
    if present then
      local level = record.levels[i]
      -- A lease's requests it did not use are given back like unused tokens.
      for _, name in ipairs(REQUEST_BUCKETS) do
        local held = level[name]
        if held and held.units > requests then
          local b = bucket(s, name)
          if refund(b, held, take_us, held.units - requests) then put_bucket(s, b) end
        end
      end
      local hold = level.tpm
      if hold then
        local tpm = bucket(s, 'tpm')
        if used_units < hold.units then
          if refund(tpm, hold, take_us, hold.units - used_units) then put_bucket(s, tpm) end
        elseif charge(tpm, used_units - hold.units) then
          put_bucket(s, tpm)
        end
      end
      if level.slot > 0 then set(s, 'conc', get(s, 'conc') - level.slot) end
      s.used = madd(s.used, neg(reserved))
      put(s, 'held', madd(s.held, neg(reserved)))
    else
      -- The hold expired and was given back: charge the request as a fresh one.
      for _, name in ipairs(BUCKETS) do
        local b = bucket(s, name)
        if charge(b, name == 'tpm' and used_units or requests) then put_bucket(s, b) end
      end
    end
    s.used = madd(s.used, cost)
    put(s, 'used', s.used)
    s.spent = madd(s.spent, cost)
    put(s, 'spent', s.spent)
    if ARGV[a + 4] == '1' then
      set(s, 'req', get(s, 'req') + requests); set(s, 'in', get(s, 'in') + input); set(s, 'out', get(s, 'out') + output)
    end
    local before, reached, spent_now = -1, -1, '0'
    local limit = ARGV[a + 6]
    if limit ~= '' then
      spent_now = s.spent
      local spent = tonumber(spent_now)
      local pct = 100
      if tonumber(limit) > 0 then pct = math.min(100, math.floor(math.max(0, spent) * 100 / tonumber(limit))) end
      local alerted = get(s, 'alerted')
      if pct >= tonumber(ARGV[a + 7]) and pct > alerted then
        set(s, 'alerted', pct)
        before, reached = alerted, pct
      end
    end
    keep_alive(s, tonumber(ARGV[a + 5]))
    alerts[#alerts + 1] = before
    alerts[#alerts + 1] = reached
    alerts[#alerts + 1] = spent_now
  end
  if present then redis.call('DEL', group.record) end
  redis.call('ZREM', group.holds, id)
  redis.call('SET', group.marker, '1', 'PX', done_ttl)
  local reply = { present and 1 or 3 }
  for _, v in ipairs(alerts) do reply[#reply + 1] = v end
  return reply
end

local function commit_one(KEYS, ARGV, request)
  local a0 = request.args_at
  local id, done_ttl, reserved, cost = ARGV[a0 + 1], tonumber(ARGV[a0 + 2]), ARGV[a0 + 3], ARGV[a0 + 4]
  local input, output, requests = tonumber(ARGV[a0 + 5]), tonumber(ARGV[a0 + 6]), tonumber(ARGV[a0 + 7])
  local plans = {}
  for g, group in ipairs(request.groups) do plans[g] = prepare_group(KEYS, ARGV, group) end
  local replies = {}
  for g, group in ipairs(request.groups) do
    replies[g] = settle_group(ARGV, group, plans[g], id, done_ttl, reserved, cost, input, output, requests)
  end
  return replies
end

-- A function taking a batch of requests (see `requests_of`), `one` deciding each.
local function batched(name, head, per_level, one)
  return function(KEYS, ARGV)
    begin()
    clock()
    local requests = requests_of(KEYS, ARGV, head, per_level)
    if not requests then
      return redis.error_reply('BADARGS ' .. name .. ': keys and arguments do not match')
    end
    return run_requests(KEYS, ARGV, requests, one)
  end
end

local reserve = batched('reserve', 7, 12, reserve_one)
local commit = batched('commit', 8, 7, commit_one)

-- release: give back everything one reservation holds on the levels of one hash tag
-- (the request did not happen). KEYS: holds zset, the record, the commit marker, the
-- tag's flags. ARGV: id, record_base. A reservation already committed, expired or
-- never taken is a no-op. Returns 1.
local function release(KEYS, ARGV)
  begin()
  clock()
  local flags = flags_of(KEYS[4], '')
  purge(KEYS[1], ARGV[2], flags)
  release_parsed(KEYS[2], read_record(KEYS[2]), KEYS[1], ARGV[1], flags.gen, flags.deleted)
  write_scopes()
  return 1
end

-- renew: keep live reservations' holds on one hash tag from expiring (a long
-- stream): each hold still held gets its expiry moved to Redis TIME + ttl_ms, and its
-- record (and the holds zset) their PEXPIRE renewed. A hold already gone (committed,
-- released, or expired and given back by a purge) is left alone: nothing is created.
-- A hold past its expiry that no purge has given back yet is still wholly counted, so
-- it is kept. KEYS: holds zset, then one record per id. ARGV: ttl_ms, record_ttl_ms,
-- then the ids (ARGV[2 + i] is the reservation of KEYS[1 + i]). Returns one integer
-- per id, in order: 1 renewed, 0 gone.
local function renew(KEYS, ARGV)
  clock()
  local ttl, record_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
  local expiry = fmt(math.floor(now / 1000) + ttl)
  local reply, renewed = {}, false
  for i = 2, #KEYS do
    local id = ARGV[i + 1]
    if redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('ZADD', KEYS[1], 'XX', expiry, id)
      redis.call('PEXPIRE', KEYS[i], record_ttl)
      reply[#reply + 1] = 1
      renewed = true
    else
      reply[#reply + 1] = 0
    end
  end
  if renewed then redis.call('PEXPIRE', KEYS[1], record_ttl) end
  return reply
end

-- follow: bring scopes to a policy just applied (the in-memory engine does this when
-- it applies a policy): buckets re-expressed in changed intervals (a limit added
-- starts full, a removed one is forgotten), a changed period kind started at once.
-- KEYS: scope hashes. ARGV: per scope rpm_interval rpd_interval tpm_interval
-- period_kind period_seconds (interval 0: no limit). Returns 1.
local function follow(KEYS, ARGV)
  begin()
  clock()
  local scopes = {}
  for i = 1, #KEYS do scopes[i] = scope(KEYS[i]) end
  for i, s in ipairs(scopes) do
    local a = (i - 1) * 5
    if not s.fresh then -- a scope never used has nothing to follow
    for j, name in ipairs(BUCKETS) do
      local b = bucket(s, name)
      if conform(b, tonumber(ARGV[a + j])) then put_bucket(s, b) end
    end
    put(s, 'rules', ARGV[a + 1] .. ':' .. ARGV[a + 2] .. ':' .. ARGV[a + 3])
    roll(s, tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), true)
    end
  end
  write_scopes()
  return 1
end

-- policy_cas: replace the shared policy document if it is still at the version the
-- caller edited (optimistic concurrency: a loser re-reads, re-applies, re-validates).
-- KEYS[1]: the policy hash (`version`, `document`, `sha256`). ARGV: expected version
-- (0: none stored), the new version (above the expected one), the new document
-- (JSON), its SHA-256, the channel to announce the new version on. Returns 1 when
-- written, 0 when the caller lost.
local function policy_cas(KEYS, ARGV)
  local raw = redis.call('HGET', KEYS[1], 'version')
  local current = 0
  if raw then
    current = tonumber(raw)
    if not current then return bad(KEYS[1], 'version', raw) end
  end
  local next = tonumber(ARGV[2])
  if current ~= tonumber(ARGV[1]) or not next or next <= current then return 0 end
  redis.call('HSET', KEYS[1], 'version', ARGV[2], 'document', ARGV[3], 'sha256', ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[2])
  return 1
end

redis.register_function('policy_cas', policy_cas)
redis.register_function('follow', follow)
redis.register_function('reserve', reserve)
redis.register_function('commit', commit)
redis.register_function('release', release)
redis.register_function('renew', renew)
