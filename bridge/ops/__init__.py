"""The operators' surface: metrics on an injected registry, logs, the admin listener
(`/metrics`, `/healthz`, `/readyz`) and trace context (`tracing`). May import `contract`
(for closed label sets) and `settings`, nothing else of the bridge."""
