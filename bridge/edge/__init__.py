"""The public HTTP edge: who may write (tokens, sources, signatures), limits, TLS, and the one
place that maps outcomes to status codes. May import `contract`, `delivery` (through the
pipeline's small interface), `ops` and `settings`."""
