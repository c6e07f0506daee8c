-- Every connection waits 100 ms before each request: 200 connections offer about 2000 req/s (5x the demo's
-- 400 req/s capacity) whether the answers are fast refusals or slow successes, so refusals are not re-sent at once.
function delay()
  return 100
end
