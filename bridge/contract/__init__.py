"""The record contract as pure functions: validation of the raw bytes, event identity, topic
routing, headers, and the JSON Schema and AsyncAPI documents made from them. Imports nothing
of the bridge, so it can be tested and reused without a network."""
