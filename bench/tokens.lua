-- bench/tokens.lua: wrk script for "a new user every request". Each request
-- carries the next user token from TOKENS_FILE (one per line, written by
-- `oboe dev --mint-users N --mint-file TOKENS_FILE`); every token is sent once,
-- across runs too: STATE_FILE holds how many tokens earlier runs used, and is
-- advanced when the run ends.
--   wrk -t1 ... -s bench/tokens.lua URL -- TOKENS_FILE STATE_FILE
--
-- When the tokens run out it sends "Bearer exhausted" (oboe answers 401, which
-- wrk counts as non-2xx), stops the thread, and reports "tokens exhausted: yes";
-- bench/run.sh then fails the run rather than count cache hits as misses.
-- One wrk thread only (-t1): the thread's state is the only copy of the cursor.

local threads = {}

function setup(thread)
    table.insert(threads, thread)
    if #threads > 1 then
        error("tokens.lua supports one wrk thread (-t1)")
    end
end

function init(args)
    tokens_file, state_file = args[1], args[2]
    if tokens_file == nil or state_file == nil then
        error("usage: wrk ... -s tokens.lua URL -- TOKENS_FILE STATE_FILE")
    end
    first = 0
    local f = io.open(state_file, "r")
    if f then
        first = tonumber(f:read("*l") or "0") or 0
        f:close()
    end
    -- Only the unused tail is kept in memory.
    tokens = {}
    local n = 0
    for line in io.lines(tokens_file) do
        n = n + 1
        if n > first and #line > 0 then
            tokens[#tokens + 1] = line
        end
    end
    sent = 0
    exhausted = false
end

function request()
    sent = sent + 1
    local token = tokens[sent]
    if token == nil then
        exhausted = true
        token = "exhausted"
        sent = #tokens
    end
    return wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. token })
end

function response(status, headers, body)
    if exhausted then
        wrk.thread:stop()
    end
end

function done(summary, latency, requests)
    local t = threads[1]
    local first, sent, exhausted = t:get("first"), t:get("sent"), t:get("exhausted")
    local f = assert(io.open(t:get("state_file"), "w"))
    f:write(string.format("%d\n", first + sent))
    f:close()
    io.write(string.format("p99.9_us: %.1f\n", latency:percentile(99.9)))
    io.write(string.format("tokens sent: %d (from #%d)\n", sent, first + 1))
    io.write(string.format("tokens exhausted: %s\n", exhausted and "yes" or "no"))
end
