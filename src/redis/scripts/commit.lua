-- Settle one reservation on every level of one hash tag: refund unused tokens and
-- money, charge overage as debt, count the request in the current period. Idempotent
-- by reservation id: a retried commit finds its marker and charges nothing again.
-- KEYS: holds zset, the record, the commit marker, the tag's flags, then one scope
-- hash per level.
-- ARGV: id, done_ttl_ms, reserved_cost, cost, input, output, record_base, generation
-- (the tag's, from the reserve; "" = unknown), then 7 per level: tpm_used_units
-- period_kind period_seconds tally idle_ttl_ms budget_limit("" = none)
-- lowest_alert_percent. Buckets and periods follow what the scope hashes store (the
-- rules in force now), not the rules the reservation was admitted under; the period
-- kind is only used for a hash that has none yet.
-- Returns {code, then per level: alerted_before alerted_now spent} with code 1 settled, 2
-- already committed, 3 committed after the hold had expired (usage charged in full as
-- debt, the request counted once in RPM and RPD), 4 the workspace was deleted since
-- the reserve (nothing settled on this tag: its counters are gone, and a re-created
-- workspace starts from zero); alerted_* are the percentages of the budget already
-- reported before this commit and reached now (-1 -1 when this commit reached nothing
-- new), so each alert fires once per period across every instance.

local id, done_ttl, reserved, cost = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local input, output, record_base, own_gen = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
purge(KEYS[1], record_base, KEYS[4])
if redis.call('EXISTS', KEYS[3]) == 1 then return { 2 } end
local alerts = {}

-- Check everything before writing anything (a failed script keeps its writes).
local record = read_record(KEYS[2])
local present = record ~= nil
local gen, deleted = generation(KEYS[4])
if deleted or (own_gen ~= '' and tonumber(own_gen) ~= gen) or (present and record.gen ~= gen) then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], id)
  redis.call('SET', KEYS[3], '1', 'PX', done_ttl)
  return { 4 }
end
for i = 5, #KEYS do check_scope(KEYS[i]) end
if present and #record.levels ~= #KEYS - 4 then
  return redis.error_reply('CORRUPT ' .. KEYS[2] .. ' n=' .. #record.levels .. ', expected ' .. (#KEYS - 4))
end
local take_us = present and record.take or 0
for i = 1, #KEYS - 4 do
  local key = KEYS[4 + i]
  local a = 8 + (i - 1) * 7
  local used_units = tonumber(ARGV[a + 1])
  roll(key, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), false)
  if present then
    local level = record.levels[i]
    local hold = level.tpm
    if hold and used_units < hold.units then
      refund(key, 'tpm', hold, take_us, hold.units - used_units)
    elseif hold and used_units > hold.units then
      charge(key, 'tpm', used_units - hold.units)
    end
    if level.slot == 1 then redis.call('HINCRBY', key, 'conc', -1) end
    add_money(key, 'used', neg(reserved))
    add_money(key, 'held', neg(reserved))
  else
    -- The hold expired and was given back: charge the request as a fresh one.
    charge(key, 'tpm', used_units)
    charge(key, 'rpm', 1)
    charge(key, 'rpd', 1)
  end
  add_money(key, 'used', cost)
  add_money(key, 'spent', cost)
  if ARGV[a + 4] == '1' then
    redis.call('HINCRBY', key, 'req', 1)
    redis.call('HINCRBY', key, 'in', input)
    redis.call('HINCRBY', key, 'out', output)
  end
  local idle = tonumber(ARGV[a + 5])
  if idle > 0 then redis.call('PEXPIRE', key, idle) end
  local before, reached, spent_now = -1, -1, '0'
  local limit = ARGV[a + 6]
  if limit ~= '' then
    spent_now = money(key, 'spent', redis.call('HGET', key, 'spent'))
    local spent = tonumber(spent_now)
    local pct = 100
    if tonumber(limit) > 0 then pct = math.min(100, math.floor(math.max(0, spent) * 100 / tonumber(limit))) end
    local alerted = redis.call('HGET', key, 'alerted')
    local last = alerted and num(key, 'alerted', alerted) or -1
    if pct >= tonumber(ARGV[a + 7]) and pct > last then
      redis.call('HSET', key, 'alerted', fmt(pct))
      before, reached = last, pct
    end
  end
  alerts[#alerts + 1] = before
  alerts[#alerts + 1] = reached
  alerts[#alerts + 1] = spent_now
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], id)
redis.call('SET', KEYS[3], '1', 'PX', done_ttl)
local reply = { present and 1 or 3 }
for _, v in ipairs(alerts) do reply[#reply + 1] = v end
return reply
