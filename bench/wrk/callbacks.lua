-- wrk script for the benchmark: POSTs Luma-shaped callbacks, a new generation id per request.
--
-- Usage: wrk -s bench/wrk/callbacks.lua URL -- TEMPLATES_FILE [RUN]
-- TEMPLATES_FILE holds one compact JSON body per line, each containing the placeholder
-- id 00000000-0000-4000-8000-000000000000 once; it is replaced by an id unique to this
-- run (RUN, a number the harness gives each wrk invocation), thread and request, so the
-- bridge's dedupe window never short-circuits a request, not even one of a later run.
-- done() prints one line "BENCH_JSON {...}" with counts and latency percentiles (µs),
-- which bench/wrkrun.py parses (wrk's own text output lacks p99.9).

local PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
local threads = {}
local next_thread = 0

function setup(thread)
  thread:set("thread_number", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

local prefixes, suffixes = {}, {}
local counter = 0
local run = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  local path = args[1]
  run = tonumber(args[2] or "0")
  local file = assert(io.open(path, "r"), "cannot open templates file " .. tostring(path))
  for line in file:lines() do
    local first, last = string.find(line, PLACEHOLDER, 1, true)
    if first then
      table.insert(prefixes, string.sub(line, 1, first - 1))
      table.insert(suffixes, string.sub(line, last + 1))
    end
  end
  file:close()
  assert(#prefixes > 0, "no template with the placeholder id in " .. path)
end

function request()
  counter = counter + 1
  local i = (counter % #prefixes) + 1
  local id = string.format("%08x-%04x-4%03x-8%03x-%012x",
    thread_number, math.floor(counter / 0x10000000) % 0x10000,
    run % 0x1000, math.floor(run / 0x1000) % 0x1000, counter)
  return wrk.format("POST", nil, headers, prefixes[i] .. id .. suffixes[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
