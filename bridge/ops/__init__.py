"""The operators' surface: metrics on an injected registry, logs, and the admin listener
(`/metrics`, `/healthz`, `/readyz`). May import `contract` (for closed label sets) and
`settings`, nothing else of the bridge."""
