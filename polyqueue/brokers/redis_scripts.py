"""The Lua scripts of the Redis broker: each step that must check and change state together.

Redis runs a script atomically, so "does this consumer still own the entry?" and the
change that depends on the answer cannot be separated by another consumer's reclaim.
Every script gets the prelude; :mod:`polyqueue.brokers.redis` registers them all.
"""

from __future__ import annotations

__all__ = ["PRELUDE", "SCRIPTS"]

# Shared by every script. KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id.
PRELUDE = """
local function owned()
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
  return type(p) == 'table' and p.err == nil and #p > 0 and p[1][2] == ARGV[2]
end
"""
SCRIPTS = {
    # ARGV[4] idle ms to set: the lease then ends ``lease - idle`` ms from now.
    "extend": """
if not owned() then return 0 end
return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
""",
    "ack": """
if not owned() then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
""",
    # ARGV[4] body, ARGV[5] maxlen: a fresh entry at the tail, the old one gone.
    "release": """
if not owned() then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'body', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
""",
    # KEYS: stream, dead. ARGV: group, consumer, min idle ms, cursor, count, dead_letter_after, maxlen.
    # Returns {next cursor, {{id, fields, deliveries}...}, {dead-lettered ids}}.
    "take": """
-- 3 elements since Redis 7 (with deleted ids), 2 on 6.2; only the first two are used
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local live, dead = {}, {}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then  -- 6.2 returns nil for a deleted entry
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if #p > 0 then n = p[1][4] end
    if n > tonumber(ARGV[6]) then
      local f = {}
      for i, v in ipairs(e[2]) do f[i] = v end
      for _, v in ipairs({'source_id', e[1], 'deliveries', n}) do f[#f + 1] = v end
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(f))
      redis.call('XACK', KEYS[1], ARGV[1], e[1])
      redis.call('XDEL', KEYS[1], e[1])
      dead[#dead + 1] = e[1]
    else
      live[#live + 1] = {e[1], e[2], n}
    end
  end
end
return {r[1], live, dead}
""",
    # On close, forget this consumer, but only while it holds no pending entry (DELCONSUMER drops them).
    "forget": """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if type(p) == 'table' and p.err == nil and #p == 0 then
  redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return 0
""",
}
