-- bench/latency.lua: wrk script that only adds the 99.9th percentile to wrk's
-- report (wrk --latency stops at 99 %). No request() function, so wrk keeps
-- its pre-built static request and its full speed.
--   wrk ... -s bench/latency.lua URL

function done(summary, latency, requests)
    io.write(string.format("p99.9_us: %.1f\n", latency:percentile(99.9)))
end
