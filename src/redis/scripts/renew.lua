-- Keep live reservations' holds on one hash tag from expiring (a long stream): each
-- hold still held gets its expiry moved to Redis TIME + ttl_ms, and its record (and the
-- holds zset) their PEXPIRE renewed. A hold already gone (committed, released, or
-- expired and given back by a purge) is left alone: nothing is created. A hold past its
-- expiry that no purge has given back yet is still wholly counted, so it is kept.
-- KEYS: holds zset, then one record per id. ARGV: ttl_ms, record_ttl_ms, then the ids
-- (ARGV[2 + i] is the reservation of KEYS[1 + i]).
-- Returns one integer per id, in order: 1 renewed, 0 gone.

local ttl, record_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local expiry = fmt(now / 1000 + ttl)
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
