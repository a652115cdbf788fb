-- bench/shared-cache/p999.lua: adds the 99.9th percentile to wrk's report
-- (--latency stops at 99 %); no request() function, so wrk keeps its static
-- pre-built request and full speed.
function done(summary, latency, requests)
    io.write(string.format("p99.9_us: %.1f\n", latency:percentile(99.9)))
end
