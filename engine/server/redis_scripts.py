"""The Lua scripts of RedisJobStore (store_redis.py documents the keys). Each state change is
one script, so it is atomic against every other client. ARGV[1] is always the key prefix p.
"""

# finish(p, id, result_json, error_json, now) -> 1 if this call completed the job.
FINISH = """
local function finish(p, id, result, err, now)
  local key = p .. 'job:' .. id
  local st = redis.call('HGET', key, 'status')
  if (not st) or st == 'COMPLETED' then return 0 end
  redis.call('HSET', key, 'status', 'COMPLETED', 'finished_at', now, 'result', result,
             'error', err)
  redis.call('ZREM', p .. 'leases', id)
  redis.call('ZREM', p .. 'queue', id)
  redis.call('ZADD', p .. 'done', now, id)
  local hook = redis.call('HGET', key, 'webhook_url')
  if hook and hook ~= '' then
    redis.call('HSET', key, 'hook_attempts', 0)
    redis.call('ZADD', p .. 'hooks', now, id)
  end
  return 1
end
"""
# ARGV: p, id, endpoint, path, input, created_at, webhook_url, idem key ('' for none),
# fingerprint -> {seq} for a new job, {'same', id} / {'conflict', id, its fingerprint} for a
# known key.
SUBMIT = """
local p, id = ARGV[1], ARGV[2]
if ARGV[8] ~= '' then
  local known = redis.call('HMGET', ARGV[8], 'job_id', 'fingerprint')
  if known[1] and redis.call('EXISTS', p .. 'job:' .. known[1]) == 1 then
    if known[2] == ARGV[9] then return {'same', known[1]} end
    return {'conflict', known[1], known[2]}
  end
  redis.call('HSET', ARGV[8], 'job_id', id, 'fingerprint', ARGV[9])
end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'job:' .. id, 'id', id, 'endpoint', ARGV[3], 'path', ARGV[4],
           'input', ARGV[5], 'status', 'IN_QUEUE', 'created_at', ARGV[6], 'webhook_url', ARGV[7],
           'attempts', 0, 'cancel_requested', 0, 'seq', seq, 'result', '', 'error', '',
           'idem', ARGV[8])
redis.call('ZADD', p .. 'queue', seq, id)
return {seq}
"""
# ARGV: p, worker_id, now, lease_s, worker info JSON
CLAIM = """
local p = ARGV[1]
local popped = redis.call('ZPOPMIN', p .. 'queue')
if #popped == 0 then return false end
local id = popped[1]
local key = p .. 'job:' .. id
redis.call('HSET', key, 'status', 'IN_PROGRESS', 'worker_id', ARGV[2], 'started_at', ARGV[3])
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('ZADD', p .. 'leases', tonumber(ARGV[3]) + tonumber(ARGV[4]), id)
redis.call('SET', p .. 'worker:' .. ARGV[2], ARGV[5], 'PX', math.ceil(tonumber(ARGV[4]) * 1000))
return id
"""
HEARTBEAT = """
local p, wid = ARGV[1], ARGV[2]
redis.call('SET', p .. 'worker:' .. wid, ARGV[5], 'PX', math.ceil(tonumber(ARGV[4]) * 1000))
local until_ = tonumber(ARGV[3]) + tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGE', p .. 'leases', 0, -1)) do
  if redis.call('HGET', p .. 'job:' .. id, 'worker_id') == wid then
    redis.call('ZADD', p .. 'leases', 'XX', until_, id)
  end
end
return 0
"""
APPEND_LOG = """
if redis.call('EXISTS', ARGV[1] .. 'job:' .. ARGV[2]) == 0 then return 0 end
return redis.call('RPUSH', ARGV[1] .. 'logs:' .. ARGV[2], ARGV[3])
"""
# ARGV: p, id, result, error, now, final log item ('' for none), written only if this call finishes
COMPLETE = FINISH + """
local done = finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if done == 1 and ARGV[6] ~= '' then redis.call('RPUSH', ARGV[1] .. 'logs:' .. ARGV[2], ARGV[6]) end
return done
"""
# ARGV: p, id, now, cancelled error JSON, log (queued), log (running)
CANCEL = FINISH + """
local p, id = ARGV[1], ARGV[2]
local st = redis.call('HGET', p .. 'job:' .. id, 'status')
if not st then return 'NOT_FOUND' end
if st == 'COMPLETED' then return 'ALREADY_COMPLETED' end
if st == 'IN_QUEUE' then
  finish(p, id, '', ARGV[4], ARGV[3])
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[5])
else
  redis.call('HSET', p .. 'job:' .. id, 'cancel_requested', 1)
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[6])
end
return 'CANCELLATION_REQUESTED'
"""
# requeue(p, id, log): back to the queue at the job's original rank.
REQUEUE = """
local function requeue(p, id, log, uncount)
  local key = p .. 'job:' .. id
  redis.call('HSET', key, 'status', 'IN_QUEUE')
  redis.call('HDEL', key, 'worker_id', 'started_at')
  if uncount and tonumber(redis.call('HGET', key, 'attempts')) > 0 then
    redis.call('HINCRBY', key, 'attempts', -1)
  end
  redis.call('ZREM', p .. 'leases', id)
  redis.call('ZADD', p .. 'queue', tonumber(redis.call('HGET', key, 'seq')), id)
  redis.call('RPUSH', p .. 'logs:' .. id, log)
end
"""
# ARGV: p, id, worker_id, now, cancelled error JSON, log
RELEASE = FINISH + REQUEUE + """
local p, id = ARGV[1], ARGV[2]
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', key, 'worker_id') ~= ARGV[3] then return 0 end
if redis.call('HGET', key, 'cancel_requested') == '1' then
  return finish(p, id, '', ARGV[5], ARGV[4])
end
requeue(p, id, ARGV[6], true)
return 1
"""
# ARGV: p, id, expected worker_id, now, process_dead ("1"/"0"), max_attempts,
#       cancelled error JSON, give-up error JSON, re-queue log, give-up log
RECOVER_ONE = FINISH + REQUEUE + """
local p, id, wid, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', key, 'worker_id') ~= wid then return 0 end
local lease = redis.call('ZSCORE', p .. 'leases', id)
local alive = redis.call('EXISTS', p .. 'worker:' .. wid) == 1
if ARGV[5] ~= '1' and alive and lease and tonumber(lease) >= now then return 0 end
if redis.call('HGET', key, 'cancel_requested') == '1' then
  finish(p, id, '', ARGV[7], ARGV[4])
elseif tonumber(redis.call('HGET', key, 'attempts')) >= tonumber(ARGV[6]) then
  finish(p, id, '', ARGV[8], ARGV[4])
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[10])
else
  requeue(p, id, ARGV[9], false)
end
return 1
"""
PURGE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'done', '-inf', '(' .. ARGV[2], 'LIMIT', 0, 500)
for _, id in ipairs(ids) do
  local idem = redis.call('HGET', p .. 'job:' .. id, 'idem')
  if idem and idem ~= '' and redis.call('HGET', idem, 'job_id') == id then
    redis.call('DEL', idem)
  end
  redis.call('DEL', p .. 'job:' .. id, p .. 'logs:' .. id)
  redis.call('ZREM', p .. 'done', id)
  redis.call('ZREM', p .. 'hooks', id)
  redis.call('HDEL', p .. 'hook_owners', id)
end
return #ids
"""
# ARGV: p, now, limit, lease end, owner -> {id, attempt, id, attempt, ...}
CLAIM_HOOKS = """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'hooks', '-inf', ARGV[2], 'LIMIT', 0,
                               tonumber(ARGV[3]))) do
  local key = p .. 'job:' .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', p .. 'hooks', id)
    redis.call('HDEL', p .. 'hook_owners', id)
  else
    table.insert(out, id)
    table.insert(out, redis.call('HINCRBY', key, 'hook_attempts', 1))
    redis.call('ZADD', p .. 'hooks', ARGV[4], id)
    redis.call('HSET', p .. 'hook_owners', id, ARGV[5])
  end
end
return out
"""
# ARGV: p, id, owner, retry_at ('' = done), log item ('' = none) -> 1 if the claim was still ours.
# With retry_at = now and no log it frees an orphaned claim (recover).
HOOK_DONE = """
local p, id = ARGV[1], ARGV[2]
if redis.call('HGET', p .. 'hook_owners', id) ~= ARGV[3] then return 0 end
redis.call('HDEL', p .. 'hook_owners', id)
if ARGV[4] == '' then
  redis.call('ZREM', p .. 'hooks', id)
else
  redis.call('ZADD', p .. 'hooks', ARGV[4], id)
end
if ARGV[5] ~= '' and redis.call('EXISTS', p .. 'job:' .. id) == 1 then
  redis.call('RPUSH', p .. 'logs:' .. id, ARGV[5])
end
return 1
"""
