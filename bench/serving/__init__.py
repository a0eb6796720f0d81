"""Serving benchmark: drive any OpenAI-compatible server with a seeded workload and schedule.

The pieces, one concept each: `lengths` and `workload` decide what is sent,
`schedule` decides when, `client` sends one request and only timestamps on the
hot path, `sse` turns the raw bytes into token arrivals afterwards, `metrics`
turns records into numbers, `runner` ties them together per target.
"""
