-- bench/shared-cache/once.lua: wrk script for bench/shared_cache.sh. Sends each
-- token of TOKENS_FILE once, in file order, over one connection (-t1 -c1, so
-- one request at a time: wrk's latency is then the per-request latency with no
-- queueing; -c1 is required), writes DONE_FILE after the last answer and stops the thread; the
-- script then interrupts wrk (SIGINT) so it reports at once.
--   wrk -t1 -c1 -d 300s -s once.lua URL -- TOKENS_FILE DONE_FILE

local threads = {}

function setup(thread)
    table.insert(threads, thread)
    if #threads > 1 then
        error("once.lua supports one wrk thread (-t1)")
    end
end

function init(args)
    tokens_file, done_file = args[1], args[2]
    if tokens_file == nil or done_file == nil then
        error("usage: wrk ... -s once.lua URL -- TOKENS_FILE DONE_FILE")
    end
    tokens = {}
    for line in io.lines(tokens_file) do
        if #line > 0 then
            tokens[#tokens + 1] = line
        end
    end
    answered, bad = 0, 0
end

-- The cursor is the number of answers, not of request() calls: wrk calls
-- request() once more than it sends (to check the script at start), and with
-- one connection the next request is only built after the previous answer.
function request()
    local token = tokens[answered + 1] or tokens[#tokens]
    return wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. token })
end

function response(status, headers, body)
    answered = answered + 1
    if status ~= 200 then
        bad = bad + 1
    end
    if answered == #tokens then
        local f = assert(io.open(done_file, "w"))
        f:write("done\n")
        f:close()
        wrk.thread:stop()
    end
end

function done(summary, latency, requests)
    local t = threads[1]
    io.write(string.format("answered: %d\n", t:get("answered")))
    io.write(string.format("non200: %d\n", t:get("bad")))
    io.write(string.format("mean_us: %.1f\n", latency.mean))
    io.write(string.format("p50_us: %.1f\n", latency:percentile(50)))
    io.write(string.format("p90_us: %.1f\n", latency:percentile(90)))
    io.write(string.format("p99_us: %.1f\n", latency:percentile(99)))
    io.write(string.format("max_us: %.1f\n", latency.max))
end
