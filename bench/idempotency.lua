-- wrk script: POST one JSON body over and over, with an Idempotency-Key chosen by MODE.
--   wrk -t1 -c32 -d5s --latency -s idempotency.lua URL -- BODY_FILE MODE [ARG]
--   MODE none                no Idempotency-Key header (the /plain baseline)
--   MODE fresh   PREFIX      a new key per request: "PREFIX-<thread>-<counter>"
--   MODE replay  KEYS_FILE   cycle through the (already completed) keys in KEYS_FILE, one a line
local body, mode, prefix, keys, counter, thread_id = nil, nil, nil, {}, 0, 0
local headers = { ["Content-Type"] = "application/json" }
local fixed

function setup(thread)
  thread_id = thread_id + 1
  thread:set("thread_id", thread_id)
end

function init(args)
  local handle = io.open(args[1], "r")
  body = handle:read("*a")
  handle:close()
  mode = args[2]
  if mode == "fresh" then
    prefix = args[3] .. "-" .. thread_id .. "-"
  elseif mode == "replay" then
    for line in io.lines(args[3]) do
      keys[#keys + 1] = wrk.format("POST", nil,
        { ["Content-Type"] = "application/json", ["Idempotency-Key"] = '"' .. line .. '"' }, body)
    end
  else
    fixed = wrk.format("POST", nil, headers, body)
  end
end

function request()
  counter = counter + 1
  if mode == "fresh" then
    headers["Idempotency-Key"] = '"' .. prefix .. counter .. '"'
    return wrk.format("POST", nil, headers, body)
  elseif mode == "replay" then
    return keys[(counter - 1) % #keys + 1]
  end
  return fixed
end
