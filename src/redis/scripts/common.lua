-- tollgate: helpers every script begins with. Redis TIME is the only clock.
-- Times are microseconds since the epoch (exact in a double until year 2255);
-- bucket levels are nanoseconds of backlog, like the in-memory GCRA (exact to
-- 104 days of backlog). Money is int64 pico-dollars, kept as strings and changed
-- only with HINCRBY so it is never rounded through a double.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function fmt(x)
  return string.format('%.0f', x)
end

local function bad(key, field, value)
  return redis.error_reply('CORRUPT ' .. key .. ' ' .. field .. '=' .. tostring(value))
end

-- A number field of a tollgate hash; absent is 0; anything else is corrupt.
local function num(key, field, raw)
  if raw == false or raw == nil then return 0 end
  local n = tonumber(raw)
  if n == nil then error(bad(key, field, raw)) end
  return n
end

-- An integer money field, validated but kept as a string.
local function money(key, field, raw)
  if raw == false or raw == nil then return '0' end
  if not string.match(raw, '^%-?%d+$') then error(bad(key, field, raw)) end
  return raw
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

local function neg(s)
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  if s == '0' then return '0' end
  return '-' .. s
end

local function add_money(key, field, amount)
  if amount ~= '0' then redis.call('HINCRBY', key, field, amount) end
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
-- and the result must): a = qa * c + ra, and ra * b / c by binary long multiplication
-- over the bits of b, keeping the remainder below c.
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

-- Rate buckets (see spec-12 / README): per bucket `name` of a scope hash, `name` is
-- the backlog in ns as of `name@` (µs), `name#` the interval (ns per unit) of the rule
-- the bucket is in (0: no limit), `name^` its epoch (+1 on a rescale, +2 when cleared
-- or its limit removed, mod 2^16) and `name-` the nanoseconds ever refunded out of it
-- (mod 2^50: only differences are used, and a wrapped difference is smaller, so a
-- wrap can only make a refund smaller). Only the reserve script (which carries the
-- current policy) changes a bucket's interval; commits and releases use the stored one.
local EPOCHS = 65536
local REFUNDED = 1125899906842624
local BUCKETS = { 'rpm', 'rpd', 'tpm' }

local function bucket(key, name)
  local v = redis.call('HMGET', key, name, name .. '@', name .. '#', name .. '^', name .. '-')
  local level, last = num(key, name, v[1]), num(key, name .. '@', v[2])
  return {
    key = key,
    name = name,
    backlog = math.max(0, level - (now - last) * 1000),
    interval = num(key, name .. '#', v[3]),
    epoch = num(key, name .. '^', v[4]),
    refunded = num(key, name .. '-', v[5]),
  }
end

local function save(b)
  redis.call('HSET', b.key, b.name, fmt(b.backlog), b.name .. '@', fmt(now), b.name .. '#', fmt(b.interval),
    b.name .. '^', fmt(b.epoch), b.name .. '-', fmt(b.refunded))
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
local function refund(key, name, hold, take_us, want)
  if not hold or want <= 0 or hold.units <= 0 then return end
  local b = bucket(key, name)
  local interval = b.interval
  if interval == 0 or b.backlog == 0 then return end
  local elapsed = math.max(0, (now - take_us) * 1000)
  local give = 0
  if b.epoch == hold.epoch and interval == hold.interval then
    -- No rule change since the take. FIFO: what was ahead of the hold drains first;
    -- every refund since the take may have been ahead of it (never more than was).
    local added = hold.units * interval
    local ahead = math.min((b.refunded - hold.seen) % REFUNDED, hold.ahead)
    local drained = math.min(math.max(elapsed - (hold.ahead - ahead), 0), added)
    give = math.min(want * interval, added - drained)
  elseif b.epoch == (hold.epoch + 1) % EPOCHS or b.epoch == hold.epoch then
    -- One rescale since the take: units convert at the faster of the two rates.
    local fastest = math.min(interval, hold.interval)
    if fastest > 0 then
      local left = math.max(0, hold.units - divceil(elapsed, fastest))
      give = math.min(want, left) * fastest
    end
  end
  -- Otherwise (two or more rule changes, or cleared) nothing of the hold is known.
  if give <= 0 then return end
  b.backlog = math.max(0, b.backlog - give)
  b.refunded = (b.refunded + give) % REFUNDED
  save(b)
end

-- Charge `units` whether or not they fit (usage beyond a hold, or a commit whose hold
-- expired): debt that later takes wait out, at the bucket's current interval.
local function charge(key, name, units)
  if units <= 0 then return end
  local b = bucket(key, name)
  if b.interval == 0 then return end
  b.backlog = b.backlog + units * b.interval
  save(b)
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

-- The period of a scope hash, started anew when now has passed the stored one. Holds
-- in flight carry over (they stay in `used` and `held`); the ended period's totals
-- become `p_*`. The hash stores its period kind (`pk`, and `pks` seconds for a custom
-- one): only `policy` (the reserve script, which carries the current policy) may
-- change it, starting the new kind's period at once and carrying what was counted
-- (as the in-memory engine does); every other caller rolls by the stored kind, and
-- passes its own only for a hash that has none yet.
local function roll(key, kind, seconds, policy)
  local v = redis.call('HMGET', key, 'ps', 'spent', 'req', 'in', 'out', 'pe', 'pk', 'pks')
  local stored = v[1]
  local start, finish
  if stored ~= false then
    if v[7] ~= false then
      local stored_kind, stored_seconds = num(key, 'pk', v[7]), num(key, 'pks', v[8])
      if policy and (stored_kind ~= kind or stored_seconds ~= seconds) then
        start, finish = bounds(kind, seconds)
        redis.call('HSET', key, 'ps', fmt(start), 'pe', fmt(finish), 'pk', fmt(kind), 'pks', fmt(seconds))
        return finish
      end
      kind, seconds = stored_kind, stored_seconds
    elseif policy then
      redis.call('HSET', key, 'pk', fmt(kind), 'pks', fmt(seconds))
    end
    start, finish = bounds(kind, seconds)
    if num(key, 'ps', stored) == start then return finish end
    local stored_end = num(key, 'pe', v[6])
    if stored_end < 0 or now < stored_end then
      -- Not ended, yet not the period containing now: a kind changed before kinds
      -- were stored (or Redis's clock went back). Only the policy moves it.
      if not policy then return stored_end end
      redis.call('HSET', key, 'ps', fmt(start), 'pe', fmt(finish))
      return finish
    end
    local spent = money(key, 'spent', v[2])
    add_money(key, 'used', neg(spent))
    redis.call('HSET', key, 'p_start', stored, 'p_spent', spent,
      'p_req', fmt(num(key, 'req', v[3])), 'p_in', fmt(num(key, 'in', v[4])),
      'p_out', fmt(num(key, 'out', v[5])))
  else
    start, finish = bounds(kind, seconds)
  end
  redis.call('HSET', key, 'ps', fmt(start), 'pe', fmt(finish), 'pk', fmt(kind), 'pks', fmt(seconds),
    'spent', '0', 'req', '0', 'in', '0', 'out', '0')
  redis.call('HDEL', key, 'alerted')
  return finish
end

-- Split "a,b,c" into numbers.
local function numbers(key, field, raw)
  local out = {}
  if raw == false or raw == nil then error(bad(key, field, 'missing')) end
  for part in string.gmatch(raw, '[^,]+') do
    local n = tonumber(part)
    if n == nil then error(bad(key, field, raw)) end
    out[#out + 1] = n
  end
  return out
end

-- Every field a scope hash may hold, checked before a script writes anything: Redis
-- does not undo a script's writes when it fails half-way, so a corrupt value must be
-- found while nothing has been changed.
local NUMERIC = {
  'rpm', 'rpm@', 'rpm#', 'rpm^', 'rpm-', 'rpd', 'rpd@', 'rpd#', 'rpd^', 'rpd-',
  'tpm', 'tpm@', 'tpm#', 'tpm^', 'tpm-', 'conc', 'ps', 'pe', 'pk', 'pks', 'req', 'in', 'out', 'alerted',
}
local MONEY = { 'used', 'held', 'spent' }

local function check_scope(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    error(redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a tollgate hash'))
  end
  local v = redis.call('HMGET', key, unpack(NUMERIC))
  for i, field in ipairs(NUMERIC) do num(key, field, v[i]) end
  v = redis.call('HMGET', key, unpack(MONEY))
  for i, field in ipairs(MONEY) do money(key, field, v[i]) end
end

-- The flags of a hash tag (`<tag>:flags`, which never expires): the workspace's
-- generation (+1 each time it is deleted) and whether it is deleted now.
local function generation(flags)
  local v = redis.call('HMGET', flags, 'gen', 'deleted')
  return num(flags, 'gen', v[1]), v[2] == '1'
end

-- A reservation record, parsed and checked whole: t (take time, µs), c (cost), n
-- (levels), g (the tag's generation at the take), k<i> (scope key), h<i> = "slot,"
-- then per bucket rpm, rpd, tpm "units,ahead,seen,epoch,interval" (16 numbers; 7 in
-- records written before holds recorded units: those give no bucket back). nil if
-- there is none.
local function read_record(rkey)
  local r = redis.call('HMGET', rkey, 't', 'c', 'n', 'g')
  if r[1] == false then return nil end
  local record = { take = num(rkey, 't', r[1]), cost = money(rkey, 'c', r[2]), gen = num(rkey, 'g', r[4]), levels = {} }
  for i = 1, num(rkey, 'n', r[3]) do
    local key = redis.call('HGET', rkey, 'k' .. i)
    if not key then error(bad(rkey, 'k' .. i, 'missing')) end
    local h = numbers(rkey, 'h' .. i, redis.call('HGET', rkey, 'h' .. i))
    local level = { key = key, slot = h[1] }
    if #h == 16 then
      for j, name in ipairs(BUCKETS) do
        local b = 1 + (j - 1) * 5
        level[name] = { units = h[b + 1], ahead = h[b + 2], seen = h[b + 3], epoch = h[b + 4], interval = h[b + 5] }
      end
    elseif #h ~= 7 then
      error(bad(rkey, 'h' .. i, table.concat(h, ',')))
    end
    check_scope(key)
    record.levels[i] = level
  end
  return record
end

-- Give back everything a parsed record holds, delete it, drop it from the holds. A
-- record of a workspace deleted since its take (another generation) gives nothing
-- back: its counters were dropped, and a re-created workspace starts from zero.
local function release_parsed(rkey, record, holds, id, flags)
  if record then
    local gen, deleted = generation(flags)
    if record.gen == gen and not deleted then
      for _, level in ipairs(record.levels) do
        for _, name in ipairs(BUCKETS) do
          local hold = level[name]
          if hold then refund(level.key, name, hold, record.take, hold.units) end
        end
        if level.slot == 1 then redis.call('HINCRBY', level.key, 'conc', -1) end
        add_money(level.key, 'used', neg(record.cost))
        add_money(level.key, 'held', neg(record.cost))
      end
    end
    redis.call('DEL', rkey)
  end
  redis.call('ZREM', holds, id)
end

local function release_record(rkey, holds, id, flags)
  release_parsed(rkey, read_record(rkey), holds, id, flags)
end

-- Release holds whose owner let them expire (crashed, or never committed).
local function purge(holds, record_base, flags)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', fmt(now / 1000), 'LIMIT', 0, 16)
  for _, id in ipairs(expired) do
    local rkey = record_base .. id
    local ok, record = pcall(read_record, rkey)
    if ok then
      release_parsed(rkey, record, holds, id, flags)
    else
      -- A corrupt record cannot say what to give back. Drop it rather than fail
      -- every call on this tag until it expires: its holds stay counted, which can
      -- refuse requests but never overspend.
      redis.call('DEL', rkey)
      redis.call('ZREM', holds, id)
    end
  end
end
