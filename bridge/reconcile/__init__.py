"""Everything the bridge asks Luma's API: completing lifecycles (`luma-kafka-bridge reconcile`)
and verifying callbacks (`LUMA_BRIDGE_VERIFY`).

Owns the reconciler (`reconciler.py`: the consumer group on the lifecycle topic, its
changelog, lookups and discovery), the client of Luma's API (`luma.py`), the
reconciler's bookkeeping (`tracking.py`) and process (`service.py`: probes, metrics,
signals), and the callback verifier (`verify.py`), which implements
`bridge.delivery.verification.CallbackVerifier` with that same client. May import
`contract`, `delivery`, `ops` and `settings`; only the command line and the composition
root (`bridge.server`, for the verifier, imported lazily: Luma's client is slow to load)
import it. The verifier lives here rather than in `edge` because it is a client of
Luma's API, and the edge layer may not import a sibling layer; the pipeline sees only
the protocol.
"""
