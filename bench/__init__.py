"""The performance benchmark: `python -m bench` (or `make bench`).

Measures, in one run against one Tansu broker and with one load generator (wrk),
the bridge against its yardsticks: a do-nothing aiohttp app (the HTTP limit), the
raw aiokafka producer (the Kafka limit) and a hand-written FastAPI peer. See
docs/performance.md for the method and the latest results.
"""
