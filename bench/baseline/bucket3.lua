-- Three token buckets checked and debited together, all or nothing: the smallest realistic
-- decision that one EVALSHA can make, as the baseline for the reservation engine.
-- KEYS[1..3]: bucket hashes {tokens, ts}, sharing one hash tag.
-- ARGV[1]: cost; ARGV[2i], ARGV[2i+1]: capacity and refill per second of bucket i.
-- Returns {1, smallest remaining} when admitted, {0, index of the short bucket} when not.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local levels = {}
for i = 1, #KEYS do
  local capacity, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local bucket = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or capacity
  local elapsed = math.max(0, now - (tonumber(bucket[2]) or now))
  tokens = math.min(capacity, tokens + elapsed * rate)
  if tokens < cost then
    return {0, i}
  end
  levels[i] = tokens
end
local smallest = nil
for i = 1, #KEYS do
  local capacity, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local left = levels[i] - cost
  redis.call('HSET', KEYS[i], 'tokens', left, 'ts', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(capacity / rate * 1000))
  if smallest == nil or left < smallest then
    smallest = left
  end
end
return {1, math.floor(smallest)}
