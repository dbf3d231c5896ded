-- wrk script for the chaos scenario: the same POST as post.lua, counting every answer by
-- status. wrk never reports a request that gets no answer at all, so this script counts
-- the requests it sends and the answers it gets; once the file named by the first script
-- argument exists, it sends nothing more, and it creates the file named by the second
-- argument when every request sent has been answered. Whatever is still unanswered when
-- the orchestrator stops wrk (SIGINT) was lost. Use with -t1.
--
-- wrk calls request() once before the run to check it; delay() runs before every real
-- request, so only calls after the first delay() are counted.
wrk.method = "POST"
wrk.body = '{"x": 1}'
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  stop_file = args[1]
  drained_file = args[2]
  req = wrk.format()
  sent = 0
  answered = 0
  codes = {}
  stopping = false
  running = false
end

local function exists(path)
  local f = io.open(path, "r")
  if f then
    f:close()
    return true
  end
  return false
end

local function check_stop()
  if not stopping and exists(stop_file) then
    stopping = true
  end
  return stopping
end

function delay()
  running = true
  if check_stop() then
    return 3600000
  end
  return 0
end

function request()
  if running then
    sent = sent + 1
  end
  return req
end

function response(status, headers, body)
  answered = answered + 1
  codes[status] = (codes[status] or 0) + 1
  if check_stop() and answered == sent then
    local f = io.open(drained_file, "w")
    if f then
      f:close()
    end
  end
end

function done(summary, latency, requests)
  local total_sent, total_answered, all_codes = 0, 0, {}
  for _, t in ipairs(threads) do
    total_sent = total_sent + t:get("sent")
    total_answered = total_answered + t:get("answered")
    for status, n in pairs(t:get("codes")) do
      all_codes[status] = (all_codes[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(all_codes) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"sent": %d, "answered": %d, "codes": {%s}, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    total_sent, total_answered, table.concat(parts, ", "), e.connect, e.read, e.write,
    e.timeout, summary.duration, latency:percentile(50), latency:percentile(99), latency.max))
end
