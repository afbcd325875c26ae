-- wrk script: POST one JSON body (read from a file) with a bearer token, over and over.
--   wrk -t1 -c16 -d10s --latency -s authzen.lua URL -- BODY_FILE TOKEN
local request_text

function init(args)
  local handle = io.open(args[1], "r")
  local body = handle:read("*a")
  handle:close()
  request_text = wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. args[2],
  }, body)
end

function request()
  return request_text
end
