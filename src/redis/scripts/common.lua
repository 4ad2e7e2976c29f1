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

-- A bucket's backlog (ns) drained to now. Given the limit's `interval`, a backlog last
-- written under another interval (the limit was changed) is re-expressed in this one,
-- so the units already taken still count.
local function level_now(key, name, interval)
  local v = redis.call('HMGET', key, name, name .. '@', name .. '#')
  local level, last = num(key, name, v[1]), num(key, name .. '@', v[2])
  local drained = math.max(0, level - (now - last) * 1000)
  local written = num(key, name .. '#', v[3])
  if interval and written > 0 and written ~= interval then
    drained = math.floor(drained * interval / written)
  end
  return drained
end

local function store_level(key, name, level, interval)
  if interval then
    redis.call('HSET', key, name, fmt(level), name .. '@', fmt(now), name .. '#', fmt(interval))
  else
    redis.call('HSET', key, name, fmt(level), name .. '@', fmt(now))
  end
end

-- Give back up to `amount` ns of a take that added `added` ns at `take_us`, when the
-- bucket's backlog was `after` ns: only the part not yet drained is returned.
local function refund(key, name, added, after, take_us, amount)
  if added <= 0 then return end
  local left = after - (now - take_us) * 1000
  local r = math.min(amount, added, left)
  if r <= 0 then return end
  store_level(key, name, math.max(0, level_now(key, name) - r))
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

-- Start a new period when now has passed the stored one. Holds in flight carry
-- over (they stay in `used` and `held`); the ended period's totals become `p_*`.
-- A stored period that has not ended but is not the one containing now means the
-- budget's period kind was changed: the new kind's period starts at once, carrying
-- what was counted (as the in-memory engine does).
local function roll(key, kind, seconds)
  local start, finish = bounds(kind, seconds)
  local v = redis.call('HMGET', key, 'ps', 'spent', 'req', 'in', 'out', 'pe')
  local stored = v[1]
  if stored ~= false then
    if num(key, 'ps', stored) == start then return finish end
    local stored_end = num(key, 'pe', v[6])
    if stored_end < 0 or now < stored_end then
      redis.call('HSET', key, 'ps', fmt(start), 'pe', fmt(finish))
      return finish
    end
    local spent = money(key, 'spent', v[2])
    add_money(key, 'used', neg(spent))
    redis.call('HSET', key, 'p_start', stored, 'p_spent', spent,
      'p_req', fmt(num(key, 'req', v[3])), 'p_in', fmt(num(key, 'in', v[4])),
      'p_out', fmt(num(key, 'out', v[5])))
  end
  redis.call('HSET', key, 'ps', fmt(start), 'pe', fmt(finish), 'spent', '0', 'req', '0', 'in', '0', 'out', '0')
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
local NUMERIC = { 'rpm', 'rpm@', 'rpm#', 'rpd', 'rpd@', 'rpd#', 'tpm', 'tpm@', 'tpm#', 'conc', 'ps', 'pe', 'req', 'in', 'out', 'alerted' }
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

-- A reservation record, parsed and checked whole: t (take time), c (cost), n (levels),
-- k<i> (scope key), h<i> = "slot,rpm_added,rpm_after,rpd_added,rpd_after,tpm_added,
-- tpm_after". nil if there is none.
local function read_record(rkey)
  local r = redis.call('HMGET', rkey, 't', 'c', 'n')
  if r[1] == false then return nil end
  local record = { take = num(rkey, 't', r[1]), cost = money(rkey, 'c', r[2]), levels = {} }
  for i = 1, num(rkey, 'n', r[3]) do
    local key = redis.call('HGET', rkey, 'k' .. i)
    if not key then error(bad(rkey, 'k' .. i, 'missing')) end
    local h = numbers(rkey, 'h' .. i, redis.call('HGET', rkey, 'h' .. i))
    if #h ~= 7 then error(bad(rkey, 'h' .. i, table.concat(h, ','))) end
    check_scope(key)
    record.levels[i] = { key = key, h = h }
  end
  return record
end

-- Give back everything a parsed record holds, delete it, drop it from the holds.
local function release_parsed(rkey, record, holds, id)
  if record then
    for _, level in ipairs(record.levels) do
      local key, h = level.key, level.h
      refund(key, 'rpm', h[2], h[3], record.take, h[2])
      refund(key, 'rpd', h[4], h[5], record.take, h[4])
      refund(key, 'tpm', h[6], h[7], record.take, h[6])
      if h[1] == 1 then redis.call('HINCRBY', key, 'conc', -1) end
      add_money(key, 'used', neg(record.cost))
      add_money(key, 'held', neg(record.cost))
    end
    redis.call('DEL', rkey)
  end
  redis.call('ZREM', holds, id)
end

local function release_record(rkey, holds, id)
  release_parsed(rkey, read_record(rkey), holds, id)
end

-- Release holds whose owner let them expire (crashed, or never committed).
local function purge(holds, record_base)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', fmt(now / 1000), 'LIMIT', 0, 16)
  for _, id in ipairs(expired) do
    local rkey = record_base .. id
    local ok, record = pcall(read_record, rkey)
    if ok then
      release_parsed(rkey, record, holds, id)
    else
      -- A corrupt record cannot say what to give back. Drop it rather than fail
      -- every call on this tag until it expires: its holds stay counted, which can
      -- refuse requests but never overspend.
      redis.call('DEL', rkey)
      redis.call('ZREM', holds, id)
    end
  end
end
