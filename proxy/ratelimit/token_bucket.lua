-- Token bucket, one atomic check. The same arithmetic as proxy/ratelimit/bucket.py.
--
-- KEYS[1]  the bucket: a hash {tokens, ts}; missing means full.
-- ARGV[1]  rate (tokens per second, float)   ARGV[2]  burst (int)   ARGV[3]  cost (int)
--
-- Time is Redis's own clock (TIME), so every proxy process and host agrees on it.
-- Floats are stored and returned with '%.17g' so they survive the round trip exactly
-- (a Lua number handed to Redis as-is would be cut to 14 digits, and a number returned
-- from a script is truncated to an integer).
--
-- Returns {allowed (0|1), tokens left, reset_after seconds, retry_after seconds}, all
-- strings. The key expires when the bucket would be full again: a missing key is a full
-- bucket, so nothing is lost and idle clients cost no memory.

-- Redis < 5 replicates scripts verbatim by default, which TIME forbids; later versions
-- replicate effects always, and there this call is a harmless no-op.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local tokens = burst
local updated_at = now
local state = redis.call('HMGET', key, 'tokens', 'ts')
if state[1] and state[2] then
  tokens = tonumber(state[1])
  updated_at = tonumber(state[2])
end

-- A clock step backwards counts as no time passed; keep the later timestamp so the
-- same interval is never refilled twice.
local elapsed = math.max(0, now - updated_at)
local available = math.min(burst, tokens + elapsed * rate)

local allowed = 0
local left = available
local retry_after = 0
if cost <= available then
  allowed = 1
  left = available - cost
elseif cost <= burst then
  retry_after = (cost - available) / rate
else
  retry_after = 1 / 0 -- never: formatted as "inf"
end

local reset_after = (burst - left) / rate
local fmt = '%.17g'
redis.call('HSET', key, 'tokens', string.format(fmt, left), 'ts',
  string.format(fmt, math.max(now, updated_at)))
-- At least 1 ms: PEXPIRE 0 would delete at once, which is also correct for a full bucket,
-- but keeping the write visible for a moment makes the behaviour easier to observe.
redis.call('PEXPIRE', key, math.max(1, math.ceil(reset_after * 1000)))

return {tostring(allowed), string.format(fmt, left), string.format(fmt, reset_after),
  string.format(fmt, retry_after)}
