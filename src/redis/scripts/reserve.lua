-- Reserve one request's worst case on every level of one hash tag, all or nothing.
-- KEYS: holds zset, this reservation's record, its commit marker, the tag's flags,
-- then one scope hash per level. ARGV: id, ttl_ms, cost, record_base, record_ttl_ms,
-- key id (the workspace group: its revocation and its workspace's deletion are
-- checked; "" for none), then 12 per level:
-- rpm_interval rpm_limit rpd_interval rpd_limit tpm_interval tpm_limit tpm_units
-- max_concurrent budget_headroom("" = none) period_kind period_seconds idle_ttl_ms.
-- Returns {1, per level: rpm_rem rpm_reset rpd_rem rpd_reset tpm_rem tpm_reset
-- (-1 where no limit), then the tag's generation} or {0, level, kind, ...} for the
-- first refusal; kind 6: the key was revoked, 7: its workspace was deleted (by any
-- instance).

local id, ttl, cost, record_base, record_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local key_id = ARGV[6]
purge(KEYS[1], record_base, KEYS[4])
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return redis.error_reply('DUPLICATE reservation id ' .. id)
end
local gen, deleted = generation(KEYS[4])
if key_id ~= '' then
  if redis.call('HGET', KEYS[4], 'revoked:' .. key_id) == '1' then return { 0, 1, 6 } end
  if deleted then return { 0, 2, 7 } end
end

-- Check every counter before writing anything (a failed script keeps its writes).
for i = 5, #KEYS do check_scope(KEYS[i]) end
local levels = #KEYS - 4
local plan = {}
-- Pass 1: read and decide, writing nothing but period rollovers and buckets brought
-- to the current rules, so a refusal leaves no level holding anything.
for i = 1, levels do
  local key = KEYS[4 + i]
  local a = 6 + (i - 1) * 12
  local p = { key = key }
  local finish = roll(key, tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11]), true)
  local rules = {
    { 'rpm', tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), 1, 1 },
    { 'rpd', tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), 1, 2 },
    { 'tpm', tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), 3 },
  }
  for _, rule in ipairs(rules) do
    local name, interval, limit, units, kind = rule[1], rule[2], rule[3], rule[4], rule[5]
    if limit <= 0 then interval = 0 end
    local b = bucket(key, name)
    if conform(b, interval) then save(b) end
    if limit > 0 then
      local tolerance = limit * interval
      local level = b.backlog
      local free = math.floor(math.max(0, tolerance - level) / interval)
      if units > limit then
        return { 0, i, kind, fmt(math.min(free, limit)), fmt(level), -1 }
      end
      local after = level + units * interval
      if after > tolerance then
        return { 0, i, kind, fmt(math.min(free, limit)), fmt(level), fmt(after - tolerance) }
      end
      p[name] = { bucket = b, units = units, after = after, remaining = math.floor((tolerance - after) / interval) }
    end
  end
  local max_conc = tonumber(ARGV[a + 8])
  if max_conc > 0 then
    local in_flight = num(key, 'conc', redis.call('HGET', key, 'conc'))
    if in_flight >= max_conc then return { 0, i, 4, fmt(in_flight) } end
    p.slot = 1
  end
  local headroom = ARGV[a + 9]
  if headroom ~= '' then
    local used = money(key, 'used', redis.call('HGET', key, 'used'))
    if cmp(used, headroom) > 0 then return { 0, i, 5, used, fmt(finish) } end
  end
  p.idle = tonumber(ARGV[a + 12])
  plan[i] = p
end

-- Pass 2: take everything and record what was taken, in units and in the terms a
-- refund needs (backlog ahead, refunds seen, epoch and interval at the take).
local reply = { 1 }
local record = { 't', fmt(now), 'c', cost, 'n', tostring(levels), 'g', fmt(gen) }
for i = 1, levels do
  local p = plan[i]
  local h = { p.slot or 0 }
  for _, name in ipairs(BUCKETS) do
    local take = p[name]
    if take then
      local b = take.bucket
      h[#h + 1] = fmt(take.units); h[#h + 1] = fmt(b.backlog); h[#h + 1] = fmt(b.refunded)
      h[#h + 1] = fmt(b.epoch); h[#h + 1] = fmt(b.interval)
      b.backlog = take.after
      save(b)
      reply[#reply + 1] = take.remaining; reply[#reply + 1] = fmt(take.after)
    else
      for _ = 1, 5 do h[#h + 1] = '0' end
      reply[#reply + 1] = -1; reply[#reply + 1] = -1
    end
  end
  if p.slot then redis.call('HINCRBY', p.key, 'conc', 1) end
  add_money(p.key, 'used', cost)
  add_money(p.key, 'held', cost)
  if p.idle > 0 then redis.call('PEXPIRE', p.key, p.idle) end
  record[#record + 1] = 'k' .. i; record[#record + 1] = p.key
  record[#record + 1] = 'h' .. i; record[#record + 1] = table.concat(h, ',')
end
redis.call('HSET', KEYS[2], unpack(record))
redis.call('PEXPIRE', KEYS[2], record_ttl)
redis.call('ZADD', KEYS[1], fmt(now / 1000 + ttl), id)
redis.call('PEXPIRE', KEYS[1], record_ttl)
reply[#reply + 1] = fmt(gen)
return reply
