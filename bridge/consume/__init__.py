"""What users run downstream of the topics: the typed consumer helper, `tail`, and dead-letter
replay. The consumer helper and `tail` import only `contract` and `settings`; replay re-enters
the bridge through `delivery`'s pipeline, so it may import `delivery` and `ops` too."""

from bridge.consume.consumer import GenerationConsumer, GenerationEvent

__all__ = ["GenerationConsumer", "GenerationEvent"]
