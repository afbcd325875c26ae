-- wrk script: POST every line of a bodies file exactly once (one wrk thread), then report how many
-- bodies were left. Sending a body twice would replay a client assertion, so wrapping is an error.
--   wrk -t1 -c32 -d10s --latency -s once.lua URL -- BODIES_FILE
local bodies, next_index, wrapped = {}, 1, false

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = wrk.format("POST", nil,
      { ["Content-Type"] = "application/x-www-form-urlencoded" }, line)
  end
end

function request()
  local req = bodies[next_index]
  next_index = next_index + 1
  if next_index > #bodies then
    next_index, wrapped = 1, true
  end
  return req
end

function done(summary, latency, requests)
  if wrapped then
    io.stderr:write("once.lua: ran out of bodies and wrapped around: generate more\n")
  end
end
