-- wrk script for the gateway benchmark: POST one chat completion per request.
--   BENCH_KEY     bearer token (default: none sent)
--   BENCH_MODEL   model name (default "fake")
--   BENCH_STREAM  "1": stream=true with stream_options.include_usage (20 chunks from the fake upstream)
-- At the end it prints one line `BENCH_RESULT {json}` that bench/run.py parses.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "fake"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hello in eight words."}],'
  .. '"max_tokens":16'
  .. (stream and ',"stream":true,"stream_options":{"include_usage":true}' or '')
  .. '}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
